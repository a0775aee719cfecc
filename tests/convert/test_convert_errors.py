"""Malformed checkpoints fail with one-line errors naming the tensor or field; the CLI."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import hf_config, hf_model  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from deepseek_tf.api.conversion import convert_to_hf, parse_size  # noqa: E402
from deepseek_tf.cli.main import main  # noqa: E402
from deepseek_tf.convert import ConversionError, convert_from_hf  # noqa: E402
from deepseek_tf.errors import ConfigError, DeepSeekTFError, RunDirError  # noqa: E402
from deepseek_tf.rundir import load_run  # noqa: E402

pytestmark = pytest.mark.hf

EXPERT = "model.layers.1.mlp.experts.7.up_proj.weight"
KV_B = "model.layers.0.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A valid tiny V3 checkpoint (layer 0 dense, layer 1 MoE)."""
    path = tmp_path_factory.mktemp("valid") / "hf"
    hf_model(hf_config(first_k_dense_replace=1), seed=9).save_pretrained(path)
    return path


def edited(source, tmp_path, tensors=None, config=None):
    """A copy of `source` with its tensors and/or config.json changed by the given functions."""
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    if tensors is not None:
        data = tensors(load_file(target / "model.safetensors"))
        save_file(data, target / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(config(data)))
    return target


def drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def replace(name, value):
    return lambda t: {**t, name: value(t[name])}


def add(name, value):
    return lambda t: {**t, name: value}


CASES = {
    "missing": (dict(tensors=drop(EXPERT)), ConversionError, f"{EXPERT}: missing"),
    "shape": (
        dict(tensors=replace(KV_B, lambda v: np.ascontiguousarray(v.T))),
        ConversionError,
        f"{KV_B}: shape (16, 64), expected (64, 16)",
    ),
    "unexpected": (
        dict(tensors=add("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32))),
        ConversionError,
        "model.layers.0.mlp.extra.weight: unexpected tensor",
    ),
    "fp8-no-scale": (
        dict(tensors=replace(KV_B, lambda v: v.astype(ml_dtypes.float8_e4m3fn))),
        ConversionError,
        f"{KV_B}: FP8 tensor without {KV_B}_scale_inv",
    ),
    "model-type": (
        dict(config=lambda c: {**c, "model_type": "llama"}),
        ConfigError,
        "config.json: model_type 'llama' is not a DeepSeek V2/V3 architecture",
    ),
    "config-field": (
        dict(config=lambda c: {k: v for k, v in c.items() if k != "qk_rope_head_dim"}),
        ConfigError,
        "config.json: missing required field 'qk_rope_head_dim'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_checkpoints_name_what_is_wrong(source, tmp_path, case, capsys):
    edits, error, message = CASES[case]
    broken = edited(source, tmp_path, **edits)
    with pytest.raises(error) as e:
        convert_from_hf(broken, tmp_path / "run")
    assert isinstance(e.value, DeepSeekTFError)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing half-written

    code = main(["convert", "--from-hf", str(broken), "--out", str(tmp_path / "run2")])
    out, err = capsys.readouterr()
    assert code == 2 and not out
    assert err.splitlines() == [f"error: {e.value}"]


ROTARY = "model.layers.0.self_attn.rotary_emb.inv_freq"


def test_rotary_inv_freq_is_ignored(source, tmp_path):
    """Older checkpoints store the rotary frequencies as `rotary_emb.inv_freq` tensors. The
    model derives them from the config, so the converter skips them: a table of wrong values
    converts to the very model the checkpoint without it gives, and only the exact name is
    skipped."""
    plain = convert_from_hf(source, tmp_path / "plain")
    extra = add(ROTARY, np.ones(4, np.float32))  # not 1 / base^(2i/d): it must not be used
    tabled = convert_from_hf(edited(source, tmp_path, tensors=extra), tmp_path / "run")
    assert tabled.n_tensors == plain.n_tensors
    (model, _), (reference, _) = load_run(tmp_path / "run"), load_run(tmp_path / "plain")
    assert len(model.weights) == len(reference.weights)
    for ours, theirs in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)
    ids = np.array([[1, 5, 9, 2, 7, 3]], np.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(reference(ids)))

    shutil.rmtree(tmp_path / "edited")
    lookalike = add(f"{ROTARY}_scale", np.ones(4, np.float32))
    with pytest.raises(ConversionError, match=f"{ROTARY}_scale: unexpected tensor"):
        convert_from_hf(edited(source, tmp_path, tensors=lookalike), tmp_path / "run2")


def test_cli_converts_both_ways_and_refuses_an_existing_run(source, tmp_path, capsys):
    run, back = tmp_path / "run", tmp_path / "back"
    assert main(["convert", "--from-hf", str(source), "--out", str(run)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.splitlines() == [
        f"wrote {run} (53 tensors, no tokenizer: the source has no tokenizer.json, "
        "so the run takes token ids)"
    ]
    assert main(["convert", "--to-hf", str(run), "--out", str(back), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"wrote {back} (53 tensors, no tokenizer)"
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(RunDirError, match="already a run directory"):
        convert_from_hf(source, run)
    assert main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(back)]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-shard-size", "lots"], "--max-shard-size: 'lots' is not a size"),
        (["--max-shard-size=0MB"], "--max-shard-size: '0MB' is not a size"),
    ],
)
def test_cli_bad_shard_sizes_are_one_line_errors(tmp_path, capsys, args, message):
    run = tmp_path / "run"  # the size is checked before the run is read
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
    with pytest.raises(ConfigError, match=message):
        convert_to_hf(run, out=tmp_path / "b", max_shard_size=args[-1].split("=")[-1])
    assert not (tmp_path / "b").exists()


def test_shard_sizes_parse_as_hugging_face_reads_them():
    assert parse_size("5GB") == 5 * 10**9 and parse_size(" 500mb ") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5KB") == 1500
    assert parse_size(4096) == 4096 and parse_size("123") == 123
    for bad in ("-1GB", "inf", "GB", True, 0):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_size(bad)


def test_from_hf_refuses_to_hf_options(source, tmp_path, capsys):
    argv = ["convert", "--from-hf", str(source), "--out", str(tmp_path / "run")]
    assert main([*argv, "--adapter-only"]) == 2
    assert "apply to --to-hf only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_max_shard_size_shards_the_export(source, tmp_path, capsys):
    run, back = tmp_path / "run", tmp_path / "back"
    assert main(["convert", "--from-hf", str(source), "--out", str(run), "--dtype", "float32"]) == 0
    args = ["convert", "--to-hf", str(run), "--out", str(back), "--max-shard-size", "20KB"]
    assert main(args) == 0
    shards = sorted(back.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 20_000 + 4096 for p in shards)
