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

from deepseek_tf.cli.main import main  # noqa: E402
from deepseek_tf.convert import ConversionError, convert_from_hf  # noqa: E402
from deepseek_tf.errors import ConfigError, DeepSeekTFError, RunDirError  # noqa: E402

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


def test_rotary_inv_freq_is_ignored(source, tmp_path):
    extra = add("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(4, np.float32))
    convert_from_hf(edited(source, tmp_path, tensors=extra), tmp_path / "run")


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
def test_cli_bad_shard_sizes_are_one_line_errors(source, tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(["convert", "--from-hf", str(source), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err


def test_cli_max_shard_size_shards_the_export(source, tmp_path, capsys):
    run, back = tmp_path / "run", tmp_path / "back"
    assert main(["convert", "--from-hf", str(source), "--out", str(run), "--dtype", "float32"]) == 0
    args = ["convert", "--to-hf", str(run), "--out", str(back), "--max-shard-size", "20KB"]
    assert main(args) == 0
    shards = sorted(back.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(p.stat().st_size <= 20_000 + 4096 for p in shards)
