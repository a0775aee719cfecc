"""The trainer end to end: signals, resume after kill -9, NaN, mixed precision, BPE, its data
checked before step 1 and its weights saved before anything after training can fail."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deepseek_tf.api import load, prepare_data, train
from deepseek_tf.config.loader import apply_overrides, update_config
from deepseek_tf.errors import DataError, RunDirError, TrainingError
from deepseek_tf.training.trainer import Trainer


def read_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_training_learns_and_logs_the_five_signals(trained_run):
    entries = read_metrics(trained_run)
    steps = [e for e in entries if "loss" in e]
    assert steps[-1]["loss"] < steps[0]["loss"]
    for signal_name in (
        "grad_norm",
        "activation_sparsity",
        "memory_mb",
        "tokens_per_sec",
        "loss_variance",
    ):
        values = [e[signal_name] for e in steps]
        assert all(np.isfinite(values)), signal_name
    assert all(
        v > 0
        for v in (
            steps[-1]["grad_norm"],
            steps[-1]["memory_mb"],
            steps[-1]["tokens_per_sec"],
            steps[-1]["loss_variance"],
        )
    )
    assert 0.0 <= steps[-1]["activation_sparsity"] <= 1.0
    assert any(e.get("val_loss") for e in entries)
    assert list((trained_run / "logs").glob("events.out.tfevents.*"))
    model, tokenizer = load(trained_run)
    assert model.vocab_size == tokenizer.vocab_size == 65


def test_existing_run_is_not_overwritten(trained_run, tiny_config):
    with pytest.raises(RunDirError, match="--resume"):
        train(tiny_config, out=trained_run, verbose=0, sample_tokens=0)


def _losses(run_dir):
    return {e["step"]: e["loss"] for e in read_metrics(run_dir) if "loss" in e}


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_kill_9_then_resume_continues_the_same_curve(tmp_path, tiny_config):
    overrides = [
        "train.steps=300",
        "train.checkpoint_every=20",
        "train.eval_every=0",
        "train.log_every=1",
    ]
    config = apply_overrides(tiny_config, overrides)
    reference = tmp_path / "reference"
    train(config, out=reference, verbose=0, sample_tokens=0)

    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "deepseek_tf.cli.main",
        "train",
        "--preset",
        "tiny",
        "--out",
        str(run),
        "--sample-tokens",
        "0",
    ] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "ckpt-40.index").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run))
    assert killed_at < 300
    # The newest checkpoint on disk counts, even when the kill came before the index
    # file named it (the index is rewritten on resume).
    on_disk = [int(p.name[5:-6]) for p in (run / "checkpoints").glob("ckpt-*.index")]
    assert 40 <= max(on_disk) <= killed_at

    summary = train(config, out=run, resume=True, verbose=0, sample_tokens=0)
    assert summary["step"] == 300
    losses, expected = _losses(run), _losses(reference)
    assert sorted(losses) == list(range(1, 301))  # no gap, no duplicate
    for step in range(1, 301):
        assert losses[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_config):
    config = apply_overrides(
        tiny_config,
        [
            "train.learning_rate=1e30",
            "train.checkpoint_every=1",
            "train.eval_every=0",
            "train.steps=50",
        ],
    )
    run = tmp_path / "nan"
    with pytest.raises(
        TrainingError, match=r"became (nan|non-finite) .* Last good checkpoint: .*ckpt-"
    ):
        train(config, out=run, verbose=0, sample_tokens=0)
    model, _ = load(run)
    weights = np.concatenate([w.numpy().ravel() for w in model.weights])
    assert np.all(np.isfinite(weights))


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_with_float32_logits(tmp_path, tiny_config, precision):
    config = apply_overrides(
        tiny_config,
        [
            f"train.precision={precision}",
            "train.steps=6",
            "train.eval_every=3",
            "train.eval_batches=1",
        ],
    )
    train(config, out=tmp_path / precision, verbose=0, sample_tokens=0)
    model, tokenizer = load(tmp_path / precision)
    assert model.compute_dtype == precision.split("_")[1]
    logits = model([tokenizer.encode("ROMEO:")])
    assert logits.dtype == "float32" and np.all(np.isfinite(logits))
    losses = [e["loss"] for e in read_metrics(tmp_path / precision) if "loss" in e]
    assert all(np.isfinite(losses))


def test_bpe_run_trains_saves_and_reloads(tmp_path, tiny_config):
    config = apply_overrides(
        tiny_config,
        ["data.tokenizer=bpe", "data.vocab_size=300", "train.steps=4", "train.eval_every=2"],
    )
    train(config, out=tmp_path / "bpe", verbose=0, sample_tokens=0)
    assert (tmp_path / "bpe" / "tokenizer.json").exists()
    model, tokenizer = load(tmp_path / "bpe")
    assert tokenizer.vocab_size == model.vocab_size <= 300
    assert tokenizer.decode(tokenizer.encode("Wherefore art thou")) == "Wherefore art thou"


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_bf16_and_fp16_track_fp32_loss(tmp_path, tiny_config):
    """Mixed precision follows the float32 loss curve (same data, same init)."""
    overrides = ["train.steps=30", "train.eval_every=0", "train.log_every=1"]
    curves = {}
    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        config = apply_overrides(tiny_config, overrides + [f"train.precision={precision}"])
        train(config, out=tmp_path / precision, verbose=0, sample_tokens=0)
        curves[precision] = np.array(list(_losses(tmp_path / precision).values()))
    fp32 = curves["float32"]
    assert fp32[-5:].mean() < fp32[:5].mean() - 0.3  # it learned something
    # bfloat16 keeps 8 bits of mantissa, float16 11: per-step losses stay within 2% / 0.5%
    np.testing.assert_allclose(curves["mixed_bfloat16"], fp32, rtol=0.02)
    np.testing.assert_allclose(curves["mixed_float16"], fp32, rtol=0.005)
    for precision in ("mixed_bfloat16", "mixed_float16"):  # the policies really took effect
        assert np.abs(curves[precision] - fp32).max() > 1e-6, precision


def test_data_without_a_validation_split_fails_before_step_1(tmp_path, tiny_config, capsys):
    """With evaluation on, a prepared directory without validation tokens is a one-line error
    before anything is trained or written (it failed at the first evaluation, after the
    training steps, with no checkpoint saved); a warm-up as long as the run is named first."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(500)))
    prepare_data([str(corpus)], out=tmp_path / "prepared", val_fraction=0.0, verbose=0)
    config = update_config(tiny_config, data={"prepared": str(tmp_path / "prepared")},
                           train={"steps": 100, "warmup_steps": 100, "eval_every": 50})  # fmt: skip
    run = tmp_path / "run"
    with pytest.raises(DataError, match="no validation tokens.*train.eval_every=0") as error:
        train(config, out=run, verbose=0, sample_tokens=0)
    assert "\n" not in str(error.value)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    err = capsys.readouterr().err
    assert "warning: train.warmup_steps 100 is more than half of train.steps 100" in err


def test_a_failing_final_evaluation_keeps_the_trained_weights(tmp_path, tiny_config, monkeypatch):
    """The last step saves before it evaluates: an evaluation that fails (here: its data
    went away) costs no trained weights."""

    def broken(self):
        raise DataError("the validation data went away")

    monkeypatch.setattr(Trainer, "validate", broken)
    config = update_config(tiny_config, train={"steps": 3, "eval_every": 3, "checkpoint_every": 0})
    with pytest.raises(DataError, match="went away"):
        train(config, out=tmp_path / "run", verbose=0, sample_tokens=0)
    assert (tmp_path / "run" / "checkpoints" / "ckpt-3.index").exists()
    model, _ = load(tmp_path / "run")
    trained = np.concatenate([w.numpy().ravel() for w in model.weights])
    assert np.all(np.isfinite(trained))
