"""Experiment tracking: TensorBoard and (offline) Weights & Biases hold the numbers of the
run's `metrics.jsonl`; the console output and the end-of-run summary of `train`."""

import io
import json
import struct
import sys

import pytest

from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import apply_overrides
from deepseek_tf.errors import ConfigError
from deepseek_tf.rundir import RunDir
from deepseek_tf.training.report import Progress
from deepseek_tf.training.tracking import (
    SKIPPED_KEYS,
    check_available,
    scalar_name,
    scalars,
)

SHORT = ["train.steps=6", "train.log_every=2", "train.eval_every=3", "train.eval_batches=1"]
SHORT += ["train.checkpoint_every=6"]


def _expected(run) -> dict:
    """`{tracker name: {step: value}}` of every numeric metrics.jsonl scalar."""
    out = {}
    for entry in RunDir(run).metrics.read():
        if "event" in entry:
            continue
        for key, value in entry.items():
            if key in SKIPPED_KEYS or not isinstance(value, float):
                continue
            out.setdefault(scalar_name(key), {})[entry["step"]] = value
    return out


def _tensorboard_scalars(directory) -> tuple[dict, list]:
    import tensorflow as tf

    scalars, texts = {}, []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if value.metadata.plugin_data.plugin_name == "text":
                    texts.append(array.item().decode())
                else:
                    scalars.setdefault(value.tag, {})[event.step] = float(array)
    return scalars, texts


def test_train_cli_output_summary_and_tensorboard(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--out", run, "--sample-tokens", "0"]
    args += [a for o in [*SHORT, "train.loggers=[tensorboard]"] for a in ("--set", o)]
    assert main(list(map(str, args))) == 0
    out = capsys.readouterr().out
    entries = RunDir(run).metrics.read()
    logged = {e["step"]: e for e in entries if "loss_avg" in e}
    assert sorted(logged) == [2, 4, 6]  # plain lines every log_every steps (not a terminal)
    for step, e in logged.items():
        assert f"step {step}/6: loss {e['loss_avg']:.4f} (mean of last 2 steps)" in out
    # the evaluation line's train loss is the logged quantity, on a line of its own
    val = {e["step"]: e for e in entries if "val_loss" in e}
    assert sorted(val) == [3, 6]
    line = next(x for x in out.splitlines() if x.startswith("step 6: val loss"))
    assert f"train loss {logged[6]['loss_avg']:.4f} (mean of last 2 steps)" in line
    best = min(val.values(), key=lambda e: e["val_loss"])
    assert f"best validation loss {best['val_loss']:.4f} at step {best['step']}" in out
    assert f"deepseek-tf generate {run} --prompt" in out and f"deepseek-tf serve {run}" in out
    assert "step 6 of 6 in" in out and (run / "loss_curves.png").stat().st_size > 1000

    scalars, texts = _tensorboard_scalars(run / "tensorboard")
    expected = _expected(run)
    assert {"train/loss", "train/loss_avg", "train/lr", "train/tokens_per_sec"} <= set(scalars)
    assert {"train/grad_norm", "val/loss", "val/perplexity"} <= set(scalars)
    assert set(scalars) == set(expected)
    for name, values in expected.items():
        assert sorted(scalars[name]) == sorted(values), name
        for step, value in values.items():
            assert scalars[name][step] == pytest.approx(value, rel=1e-6), (name, step)
    assert any("loggers:" in t and "d_model: 32" in t for t in texts)  # the resolved config

    # nothing left to do: one line, exit 0
    assert main(["train", "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "restored" in out and "(step 6 of 6)" in out
    assert "already complete (step 6 of 6)" in out


def test_progress_on_a_terminal_keeps_other_lines_off_the_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(total=4, window=2, stream=stream)
    entry = {"loss_avg": 2.5, "loss_avg_steps": 2, "lr": 1e-3, "tokens_per_sec": 10.0}
    progress.step(2, {**entry, "grad_norm": 1.0})
    progress.message("step 2: val loss 2.6")
    progress.step(4, {**entry, "grad_norm": 1.0})
    progress.close()
    text = stream.getvalue()
    lines = text.split("\n")
    assert lines[1] == "step 2: val loss 2.6"  # its own line, after the bar's
    assert "step 2/4: loss 2.5000 (mean of last 2 steps)" in lines[0]
    assert text.endswith("\n") and "step 4/4" in lines[2]


def test_logger_names_are_checked(tiny_config, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.loggers: 'tensorbord' is not one of"):
        apply_overrides(tiny_config, ["train.loggers=[tensorbord]"])
    with pytest.raises(ConfigError, match="train.log_weights: .*add wandb to train.loggers"):
        apply_overrides(tiny_config, ["train.log_weights=true"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install deepseek-tf\[tracking\]"):
        check_available(("tensorboard", "wandb"))


def test_tracked_scalars_are_the_numeric_metrics_entries():
    entry = {"step": 4, "tokens": 64, "loss": 2.5, "loss_avg": 2.6, "loss_avg_steps": 2}
    entry.update(lr=1e-3, load_max_mean=1.5, load_min_mean=0.5, expert_load=[[0.5, 0.5]])
    assert scalars(entry) == {
        "train/loss": 2.5,
        "train/loss_avg": 2.6,
        "train/lr": 1e-3,
        "train/load_max_mean": 1.5,
        "train/load_min_mean": 0.5,
    }
    assert scalars({"step": 4, "val_loss": 2.0, "val_perplexity": 7.4}) == {
        "val/loss": 2.0,
        "val/perplexity": 7.4,
    }


def _wandb_records(path):
    """The records of an offline run's `.wandb` file (LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header; wandb prefixes a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


# `slow`: .ci/run's marker pass is the one with the [tracking] extra installed
@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(tmp_path, tiny_config, monkeypatch):
    pytest.importorskip("wandb")  # the [tracking] extra
    from deepseek_tf.api import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = apply_overrides(
        tiny_config, [*SHORT, "train.loggers=[wandb]", "train.log_weights=true"]
    )
    run = tmp_path / "run"
    train(config, out=run, verbose=0, sample_tokens=0)
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history, config_items, artifacts = {}, {}, []
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:  # "train/loss" is a nested key
                key, value = item.key or "/".join(item.nested_key), json.loads(item.value_json)
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = value
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config_items.update({u.key: json.loads(u.value_json) for u in updates})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    expected = _expected(run)
    assert set(history) == set(expected)
    for name, values in expected.items():
        assert history[name] == pytest.approx(values, rel=1e-9), name
    assert config_items["model"]["d_model"] == 32
    assert config_items["train"]["loggers"] == ["wandb"]
    assert [a.type for a in artifacts] == ["model"]
    names = {f.path for a in artifacts for f in a.manifest.contents}
    assert {"config.yaml", "char_tokenizer.json", "checkpoints/ckpt-6.index"} <= names
