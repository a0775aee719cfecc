"""Resuming a run: what a failed, corrupted, interrupted or extended run does.

Each test builds a real run on disk (the tiny preset, a few steps) and breaks it the way
a kill, a full disk or a user does.
"""

import json
import os
import shutil
import signal

import pytest

from deepseek_tf.api import train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError, RunDirError
from deepseek_tf.rundir import RunDir

FAST = ["train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2"]


@pytest.fixture()
def short_run(tmp_path, shared_run):
    """A finished 6-step run with checkpoints at steps 2, 4, 6 (a copy of one trained once)."""
    overrides = [*FAST, "train.steps=6", "train.keep_checkpoints=5"]
    run = tmp_path / "run"
    shutil.copytree(shared_run("tiny", overrides), run)
    return load_config("tiny", overrides=overrides), run


def _snapshot(run):
    return {
        str(p.relative_to(run)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in run.rglob("*")
        if p.is_file()
    }


def _steps(run):
    return [e["step"] for e in RunDir(run).metrics.read() if "loss" in e]


def test_failed_resume_writes_nothing(short_run, tmp_path):
    config, run = short_run
    (run / "config.yaml").unlink()
    before = _snapshot(run)
    with pytest.raises(RunDirError, match="no config.yaml"):
        train(config, out=run, resume=True, verbose=0, sample_tokens=0)
    assert _snapshot(run) == before  # not overwritten by a fresh default run
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match="no config.yaml"):
        train(config, out=empty, resume=True, verbose=0, sample_tokens=0)
    assert not any(empty.iterdir())
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    with pytest.raises(RunDirError, match="is an existing file"):
        train(config, out=not_a_dir, verbose=0, sample_tokens=0)


def test_garbled_index_resumes_from_the_newest_checkpoint(short_run, capsys):
    config, run = short_run
    (run / "checkpoints" / "checkpoint").write_text("garbage {{{")
    longer = apply_overrides(config, ["train.steps=8"])
    summary = train(longer, out=run, resume=True, verbose=1, sample_tokens=0)
    out = capsys.readouterr()
    assert "restored" in out.out and "ckpt-6" in out.out
    assert summary["step"] == 8
    assert _steps(run) == list(range(1, 9))  # history kept: no restart from step 0


def test_truncated_data_file_falls_back_to_the_previous_checkpoint(short_run, capsys):
    config, run = short_run
    data = run / "checkpoints" / "ckpt-6.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    longer = apply_overrides(config, ["train.steps=8"])
    summary = train(longer, out=run, resume=True, verbose=1, sample_tokens=0)
    out = capsys.readouterr()
    assert "ckpt-6.data-00000-of-00001 is truncated or corrupt" in out.out
    assert "falling back to ckpt-4" in out.out and "restored" in out.out
    assert summary["step"] == 8 and _steps(run) == list(range(1, 9))
    assert (run / "checkpoints" / "corrupt" / data.name).exists()  # set aside, not deleted
    # every checkpoint corrupt: one line naming the files
    for data in (run / "checkpoints").glob("ckpt-*.data-*"):
        data.write_bytes(b"")
    with pytest.raises(RunDirError, match="no readable checkpoint.*truncated or corrupt"):
        RunDir(run).load()


def test_a_checkpoint_of_another_model_is_not_called_corrupt(short_run, tmp_path):
    _, run = short_run
    other = apply_overrides(RunDir(run).read_config(), ["model.d_model=64"])
    RunDir(run).write_config(other)
    with pytest.raises(RunDirError, match="does not match the model"):
        RunDir(run).load()


def test_interrupted_save_and_its_temp_directory(short_run, capsys):
    config, run = short_run
    stale = run / "checkpoints" / "ckpt-8_temp"
    stale.mkdir()
    (stale / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x" * 10)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 7, "loss": 1.')  # a torn last line
    tokenizer = run / "char_tokenizer.json"
    inode = tokenizer.stat().st_ino
    summary = train(
        apply_overrides(config, ["train.steps=8"]), out=run, resume=True, verbose=1, sample_tokens=0
    )
    assert summary["step"] == 8 and not stale.exists()
    assert "removed ckpt-8_temp" in capsys.readouterr().out
    assert _steps(run) == list(range(1, 9))
    assert tokenizer.stat().st_ino == inode  # the tokenizer is not rewritten on resume


def test_sigterm_during_a_checkpoint_write_keeps_that_checkpoint(short_run):
    """The signal arrives while the write is under way: the write completes, then the
    interrupt is raised (before: it was raised mid-save and the checkpoint was lost)."""
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.training.signals import raise_interrupt, signals_deferred

    config, run = short_run
    model = build_model(RunDir(run).read_config())
    checkpoint = RunDir(run).checkpoint(model)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            checkpoint.save(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (run / "checkpoints" / "ckpt-10.index").exists()
    assert checkpoint.restore() == 10


def test_extending_a_run_says_what_happens_to_the_schedule(short_run, capsys):
    config, run = short_run
    before = _snapshot(run)
    summary = train(config, out=run, resume=True, verbose=1, sample_tokens=0)
    out = capsys.readouterr()
    assert summary.get("already_complete") and "already complete" in out.out
    assert _snapshot(run) == before  # nothing to do, nothing written
    train(
        apply_overrides(config, ["train.steps=10"]),
        out=run,
        resume=True,
        verbose=1,
        sample_tokens=0,
    )
    err = capsys.readouterr().err
    assert "learning-rate schedule changed (train.steps 6 -> 10)" in err
    assert RunDir(run).read_config().train.steps == 10


def test_explicit_vocab_size_is_honoured_or_refused(tmp_path, tiny_config):
    small = apply_overrides(tiny_config, ["model.vocab_size=1", "train.steps=1"])
    with pytest.raises(ConfigError, match="model.vocab_size: 1 is smaller than the tokenizer's 65"):
        train(small, out=tmp_path / "small", verbose=0, sample_tokens=0)
    assert not (tmp_path / "small").exists()
    padded = apply_overrides(tiny_config, ["model.vocab_size=80", *FAST, "train.steps=1"])
    train(padded, out=tmp_path / "padded", verbose=0, sample_tokens=0)
    assert RunDir(tmp_path / "padded").read_config().model.vocab_size == 80
    entries = (tmp_path / "padded" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in entries)
