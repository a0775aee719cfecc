"""`convert --from-hf --quantize int8|int4`: the checkpoint quantized tensor by tensor as it
is read gives exactly what `compress quantize` makes of the float conversion, and no
float projection outlives its quantization."""

import gc
import weakref

import numpy as np
import pytest
from convert_helpers import TINY

import deepseek_tf.convert.quantized_weights as quantized_weights
from deepseek_tf.cli.main import main
from deepseek_tf.compress.quantization import quantize_model
from deepseek_tf.convert import convert_from_hf, convert_to_hf
from deepseek_tf.convert.hf_config import config_from_hf
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import build_model
from deepseek_tf.rundir import RunDir

HF = {  # DeepSeek-V3-shaped: q-LoRA MLA, a dense layer then an MoE layer, an untied head
    **{k: v for k, v in TINY.items() if v is not None},
    "model_type": "deepseek_v3",
    "first_k_dense_replace": 1,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A bfloat16 Hugging Face checkpoint written by `convert_to_hf` (no torch needed)."""
    root = tmp_path_factory.mktemp("quantized")
    config = config_from_hf(HF)
    model = build_model(config, seed=0)  # the initialisers' weights
    RunDir(root / "float_src").write_weights_run(config, None, model)
    convert_to_hf(root / "float_src", root / "hf", dtype="bfloat16")
    return root / "hf"


def weights(run) -> dict:
    model, _ = RunDir(run).load()
    return by_path(model), model


def by_path(model) -> dict:
    return {v.path.split("/", 1)[1]: v.numpy() for v in model.variables}


@pytest.mark.parametrize(("mode", "group"), [("int8", -1), ("int4", 8)])
def test_streamed_quantization_equals_compress_quantize_of_the_float_run(
    hf_dir, tmp_path, mode, group
):
    summary = convert_from_hf(hf_dir, tmp_path / "q", quantize=mode, group_size=group)
    assert summary.quantize == mode and f"{mode} weights" in summary.describe()
    c = RunDir(tmp_path / "q").read_config().compression
    assert (c.quantize, c.quantize_group_size) == (mode, group)
    assert set(c.quantize_include) == {"attention", "ffn", "experts", "head"}
    convert_from_hf(hf_dir, tmp_path / "float")
    # what `compress quantize` does to the loaded float run (its transform)
    float_model, _ = RunDir(tmp_path / "float").load()
    config = RunDir(tmp_path / "float").read_config()
    include = c.quantize_include
    quantize_model(float_model, config.model, mode, include=include, bits=4, group_size=group)
    compressed = by_path(float_model)
    streamed, q_model = weights(tmp_path / "q")
    assert streamed.keys() == compressed.keys()
    codes = [p for p in streamed if streamed[p].dtype == np.int8]
    assert len(codes) >= 12  # every projection of 2 layers and the head, expert stacks too
    for path, value in streamed.items():
        np.testing.assert_array_equal(value, compressed[path], err_msg=path)
    float_model, _ = RunDir(tmp_path / "float").load()  # afresh: float
    ids = np.random.default_rng(1).integers(0, HF["vocab_size"], (2, 12))
    want, got = np.asarray(float_model(ids), np.float32), np.asarray(q_model(ids), np.float32)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < {"int8": 0.05, "int4": 0.3}[mode], err  # weight-only codes, not exact


def test_each_float_projection_is_freed_once_quantized(hf_dir, tmp_path, monkeypatch):
    """When a weight is written, no earlier projection's float variable is alive, and the
    routed experts never exist in float (written as codes, a block of experts at a time)."""
    written, write = [], quantized_weights.write_entry
    stacks, write_codes = [], quantized_weights.write_expert_codes

    def tracked(entry, reader):
        gc.collect()
        alive = [(owner, path) for ref, owner, path in written if ref() is not None]
        # MLA's kv_b_proj stays float (absorbed decoding folds it into the query and output)
        stale = [p for owner, p in alive if owner is not entry.owner and "kv_b_proj" not in p]
        assert not stale, f"{stale} alive when {entry.names[0]} is written"
        write(entry, reader)
        if entry.owner is not None:
            written.append((weakref.ref(entry.variable), entry.owner, entry.variable.path))

    def codes_only(entry, reader, mode, group_size):
        moe, stack = entry.owner
        assert not hasattr(moe, stack) and entry.variable.dtype == "int8"  # no float stack
        stacks.append(stack)
        return write_codes(entry, reader, mode, group_size)

    monkeypatch.setattr(quantized_weights, "write_entry", tracked)
    monkeypatch.setattr(quantized_weights, "write_expert_codes", codes_only)
    convert_from_hf(hf_dir, tmp_path / "q", quantize="int8")
    gc.collect()
    alive = [p for ref, _, p in written if ref() is not None]
    assert len(written) >= 17 and alive and all("kv_b_proj" in p for p in alive), alive
    assert stacks == ["experts_gate", "experts_up", "experts_down"]


def test_bad_quantize_requests_are_one_line_errors(hf_dir, tmp_path, capsys):
    out = tmp_path / "q"
    with pytest.raises(CompressionError, match="--group-size 5: must divide the experts"):
        convert_from_hf(hf_dir, out, quantize="int4", group_size=5)
    argv = ["convert", "--from-hf", str(hf_dir), "--out", str(out)]
    for extra, message in [
        (["--quantize", "int4", "--group-size", "5"], "--group-size 5: must divide"),
        (["--group-size", "8"], "--group-size applies to --quantize only"),
    ]:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()
    back = ["convert", "--to-hf", str(out), "--out", str(tmp_path / "b")]
    assert main([*back, "--quantize", "int8"]) == 2
    assert "apply to --from-hf only" in capsys.readouterr().err
