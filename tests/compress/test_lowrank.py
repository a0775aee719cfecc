"""`compress lowrank`: truncated-SVD factor pairs, rank by energy or fixed, CLI runs."""

import json

import numpy as np
import pytest

from deepseek_tf.errors import CompressionError

PROMPT = "To be, or not to be: that is the question"


def _ids(tokenizer):
    return np.asarray([tokenizer.encode(PROMPT)], "int32")  # (1, T)


def _fresh(trained_run):
    """A private copy of the shared run's model (the `loaded` fixture stays read-only)."""
    from deepseek_tf.rundir import RunDir, load_run

    model, tokenizer = load_run(trained_run)
    return RunDir(trained_run).read_config(), model, tokenizer


def test_exact_low_rank_kernels_are_reproduced(trained_run):
    from deepseek_tf.compress.low_rank import factorize
    from deepseek_tf.compress.run_io import count_parameters
    from deepseek_tf.layers.low_rank_dense import LowRankDense

    config, model, tokenizer = _fresh(trained_run)
    rng = np.random.default_rng(0)
    for block in model.blocks:
        for name in ("gate_proj", "up_proj", "down_proj"):
            kernel = getattr(block.ffn, name).kernel
            n_in, n_out = kernel.shape
            a = rng.normal(size=(n_in, 4)) * 0.1  # (in, 4)
            b = rng.normal(size=(4, n_out)) * 0.1  # (4, out)
            kernel.assign((a @ b).astype("float32"))  # exactly rank 4
    ids = _ids(tokenizer)
    reference = model(ids).numpy()
    for options in ({"rank": 4}, {"energy": 1.0}):
        new_config, new_model, info = factorize(model, config, targets="ffn", **options)
        assert set(info["ranks"].values()) == {4}, options
        assert len(info["ranks"]) == 3 * len(model.blocks) and not info["skipped"]
        assert isinstance(new_model.blocks[0].ffn.up_proj, LowRankDense)
        assert "0/ffn/up_proj=4" in new_config.compression.lowrank
        np.testing.assert_allclose(new_model(ids).numpy(), reference, atol=1e-5)
        assert count_parameters(new_model) < count_parameters(model)


def test_energy_threshold_drops_parameters(trained_run, loaded):
    from deepseek_tf.compress.low_rank import factorize
    from deepseek_tf.compress.run_io import count_parameters
    from deepseek_tf.rundir import RunDir

    model, tokenizer = loaded
    config = RunDir(trained_run).read_config()
    ids = _ids(tokenizer)
    reference = model(ids).numpy()
    before = [v.numpy().copy() for v in model.weights]
    _, new_model, info = factorize(model, config, targets="attention,ffn", energy=0.9)
    assert info["ranks"] and all(r >= 1 for r in info["ranks"].values())
    assert any(k.split("/")[1] == "attention" for k in info["ranks"])
    assert all(info["energy_kept"][k] >= 0.9 for k in info["ranks"])
    assert count_parameters(new_model) < count_parameters(model)
    diff = np.abs(new_model(ids).numpy() - reference).max()
    assert 1e-6 < diff < 0.25 * np.abs(reference).max()
    for old, v in zip(before, model.weights):  # the source model is untouched
        np.testing.assert_array_equal(old, v.numpy())


def test_ranks_that_save_nothing_are_skipped(loaded, trained_run):
    from deepseek_tf.compress.low_rank import factorize
    from deepseek_tf.rundir import RunDir

    model, _ = loaded
    config = RunDir(trained_run).read_config()
    # ffn kernels are 32x64: rank 30 >= 32 * 64 / 96 saves no parameters
    new_config, _, info = factorize(model, config, targets="ffn", rank=30)
    assert info["ranks"] == {} and new_config.compression.lowrank == ()
    assert {s["projection"] for s in info["skipped"]} >= {"0/ffn/up_proj", "1/ffn/down_proj"}


def test_mla_and_moe_projections():
    from deepseek_tf.compress.low_rank import factorize
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.models.builder import build_model

    config = load_config("tiny-moe", overrides=["model.vocab_size=40"])
    model = build_model(config, seed=0)
    new_config, new_model, info = factorize(model, config, targets="attention,ffn", rank=2)
    assert {"0/attention/q_a_proj", "0/attention/kv_a_proj_with_mqa", "0/ffn/up_proj"} <= set(
        info["ranks"]
    )
    assert not any("kv_b_proj" in k for k in info["ranks"])
    assert not any(k.startswith("1/ffn") for k in info["ranks"])  # layer 1 is MoE
    assert {"projection": "1/ffn", "reason": "MoE feed-forward"} in info["skipped"]
    ids = np.zeros((1, 5), "int32")
    assert new_model(ids).shape == model(ids).shape


def test_option_errors(loaded, trained_run, tmp_path, capsys):
    from deepseek_tf.cli.main import main
    from deepseek_tf.compress.low_rank import factorize
    from deepseek_tf.rundir import RunDir

    model, _ = loaded
    config = RunDir(trained_run).read_config()
    with pytest.raises(CompressionError, match=r"--rank 33.*0/ffn/gate_proj"):
        factorize(model, config, targets="ffn", rank=33)
    with pytest.raises(CompressionError, match="--targets"):
        factorize(model, config, targets="ffn,heads", rank=2)
    out = tmp_path / "out"
    for option in (["--energy", "1.5"], ["--rank", "100"], ["--energy", "0"]):
        code = main(["compress", "lowrank", str(trained_run), "--out", str(out), *option])
        err = capsys.readouterr().err
        assert code == 2 and "error:" in err and option[0] in err, err
    assert not (out / "checkpoints").exists()


def test_cli_writes_loadable_run(trained_run, tmp_path, capsys):
    from deepseek_tf.cli.main import main
    from deepseek_tf.rundir import RunDir, load_run

    out = tmp_path / "lowrank"
    argv = ["compress", "lowrank", str(trained_run), "--out", str(out), "--quiet"]
    argv += ["--targets", "attention,ffn", "--energy", "0.8", "--steps", "2"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["method"] == "lowrank" and record["options"]["energy"] == 0.8
    assert record["parameters_after"] < record["parameters_before"]
    assert np.isfinite(record["val_loss_after"]) and record["seconds"] > 0
    history = json.loads((out / "compression.json").read_text())
    assert history[-1]["ranks"] == record["ranks"]
    config = RunDir(out).read_config()
    ranks = record["ranks"].items()
    assert sorted(config.compression.lowrank) == sorted(f"{k}={r}" for k, r in ranks)
    model, tokenizer = load_run(out)
    assert model(_ids(tokenizer)).shape[-1] == config.model.vocab_size
