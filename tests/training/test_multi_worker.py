"""Multi-worker (MultiWorkerMirroredStrategy) and multi-replica training, in real processes.

Workers run on 127.0.0.1 with free ports; each is `deepseek-tf train` launched through
`mw_worker.py`, which adds test-only hooks (final weights as .npz; a single-process
reference fed the union of the shards' batches).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
WORKER = str(HERE / "mw_worker.py")
TIMEOUT = 240  # seconds for one multi-worker job; a hung collective fails, not blocks


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start_workers(out, tmp_path, args, tag, resume=False, preset="tiny"):
    """Starts two workers of one job; returns the Popen objects (logs in tmp_path)."""
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        env = _env(
            TF_CONFIG=json.dumps(tf_config), DEEPSEEK_TF_TEST_WEIGHTS=tmp_path / f"{tag}-w{i}.npz"
        )
        cmd = [sys.executable, WORKER, "train", "--out", str(out)]
        cmd += ["--resume"] if resume else ["--preset", preset]
        cmd += ["--set", "runtime.strategy=multi_worker", *args]
        with open(tmp_path / f"{tag}-worker{i}.log", "w") as log:  # the child keeps its copy
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_all(procs, tmp_path, tag):
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"multi-worker job timed out:\n{_logs(tmp_path, tag)}")
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes}:\n{_logs(tmp_path, tag)}"


def _reference_run(tmp_path, preset, args, **env):
    """The single-process reference of a two-worker job: one process fed the union of
    the two shards' batches (`mw_worker.py`'s hook); returns its run directory."""
    ref = tmp_path / "ref"
    cmd = [sys.executable, WORKER, "train", "--preset", preset, "--out", str(ref), *args]
    env = _env(DEEPSEEK_TF_TEST_REFERENCE_SHARDS=2, **env)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return ref


def _logs(tmp_path, tag):
    return "\n".join(
        f"--- {f.name}\n" + f.read_text()[-3000:]
        for f in sorted(tmp_path.glob(f"{tag}-worker*.log"))
    )


def _weights(path):
    with np.load(path) as data:
        return [data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))]


def _losses(run_dir):
    entries = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


COMMON = [
    "--set",
    "train.eval_every=0",
    "--set",
    "train.log_every=1",
    "--set",
    "train.batch_size=4",
]


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_two_workers_match_a_single_process_fed_the_same_global_batches(tmp_path):
    """Both workers end with bit-identical weights; loss and weights equal a single-process
    run whose global batch k is the union of the two shards' batch k (the sharded pipeline
    does not reproduce the unsharded batches, so the reference gets the same sequences)."""
    out = tmp_path / "run"
    args = [*COMMON, "--set", "train.steps=6"]
    _wait_all(_start_workers(out, tmp_path, args, "mw"), tmp_path, "mw")

    w0, w1 = _weights(tmp_path / "mw-w0.npz"), _weights(tmp_path / "mw-w1.npz")
    assert all(np.array_equal(a, b) for a, b in zip(w0, w1, strict=True))
    # Only the chief, which wrote the run directory, prints the sample (the other worker
    # exited 2 reading a run directory it never wrote).
    logs = [(tmp_path / f"mw-worker{i}.log").read_text() for i in range(2)]
    assert "--- sample ---" in logs[0] and "--- sample ---" not in logs[1]
    # Only the chief wrote the run directory; the non-chief's checkpoints were temporary.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint",
        "ckpt-6.data-00000-of-00001",
        "ckpt-6.index",
    ]
    assert (out / "config.yaml").exists() and list((out / "logs").iterdir())

    ref = _reference_run(tmp_path, "tiny", args, DEEPSEEK_TF_TEST_WEIGHTS=tmp_path / "ref.npz")

    mw, single = _losses(out), _losses(ref)
    assert sorted(mw) == sorted(single) == list(range(1, 7))
    # Same sequences, same update (incl. global-norm clipping): only float summation
    # order differs. Measured: equal losses, weights within 1.2e-7.
    for step in mw:
        assert mw[step] == pytest.approx(single[step], abs=1e-5), step
    for a, b in zip(w0, _weights(tmp_path / "ref.npz"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


MIRRORED_SCRIPT = r"""
import json, sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from deepseek_tf.api import train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError

out = Path(sys.argv[1])
base = ["train.eval_every=3", "train.log_every=1", "train.steps=6", "train.checkpoint_every=3"]
mirrored = base + ["runtime.strategy=mirrored"]


def config(overrides):
    return apply_overrides(load_config("tiny"), overrides)


def losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}


try:
    train(config(mirrored + ["train.batch_size=3"]), out=out / "odd", verbose=0, sample_tokens=0)
    raise SystemExit("expected a ConfigError for batch_size 3 over 2 replicas")
except ConfigError as e:
    assert "train.batch_size" in str(e), e
summary = train(config(mirrored + ["train.batch_size=4"]), out=out / "mirrored", sample_tokens=0)
print("SUMMARY", summary["step"])
train(config(base + ["train.batch_size=4"]), out=out / "single", verbose=0, sample_tokens=0)
# Resume the mirrored run from its step-3 checkpoint: the same steps 4..6 again.
ckpt = out / "mirrored" / "checkpoints"
first = losses(out / "mirrored")
for path in ckpt.glob("ckpt-6.*"):  # the newest checkpoint on disk is the one resumed
    path.unlink()
resumed = train(config(mirrored + ["train.batch_size=4"]), out=out / "mirrored", resume=True,
                sample_tokens=0)
print("LOSSES", json.dumps([first, losses(out / "single"), losses(out / "mirrored")]))
"""


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_mirrored_strategy_on_two_logical_cpus_trains_and_resumes(tmp_path):
    """One pipeline feeds both replicas consecutive half-batches: the same sequences as
    the single-device global batch, so the losses match; a resume continues exactly."""
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUMMARY 6" in done.stdout
    assert "2 per replica x 2 replicas" in done.stdout
    assert "[train] steps 3->6" in done.stdout
    first, single, resumed = (
        {int(k): v for k, v in d.items()}
        for d in json.loads(done.stdout.split("LOSSES ")[1].splitlines()[0])
    )
    assert sorted(first) == sorted(single) == sorted(resumed) == list(range(1, 7))
    for step in first:
        assert first[step] == pytest.approx(single[step], abs=1e-5), step
        assert resumed[step] == pytest.approx(first[step], abs=1e-6), step
    entries = [
        json.loads(x) for x in (tmp_path / "mirrored" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("val_loss" in e for e in entries)


@pytest.mark.parametrize(
    "tf_config, message",
    [(None, "needs TF_CONFIG"), ("{not json", "malformed"), ('{"cluster": {}}', "malformed")],
)
def test_multi_worker_without_a_valid_tf_config_is_a_config_error(monkeypatch, tf_config, message):
    from deepseek_tf.config.loader import apply_overrides, load_config
    from deepseek_tf.errors import ConfigError
    from deepseek_tf.training.runtime import make_strategy

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    cfg = apply_overrides(load_config("tiny"), ["runtime.strategy=multi_worker"])
    with pytest.raises(ConfigError, match=message):
        make_strategy(cfg.runtime)


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,extra,steps",
    [("tiny", [], 400), ("tiny-moe", ["--set", "runtime.expert_parallel=2"], 160)],
    ids=["data-parallel", "expert-parallel"],
)
def test_a_killed_worker_stops_the_other_with_a_clear_error_and_the_job_resumes(
    tmp_path, preset, extra, steps
):
    """kill -9 of the chief mid-run: the surviving worker does not hang at its next
    collective, it exits 2 with one line naming the problem (TensorFlow's coordination
    service notices the dead peer); both restarted with --resume continue the run (with
    expert parallelism each worker holding half the experts)."""
    out = tmp_path / "run"
    args = [*COMMON, "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=20"]
    procs = _start_workers(out, tmp_path, args + extra, "first", preset=preset)
    index = out / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + TIMEOUT
    while not index.exists() and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    time.sleep(0.3)  # mid-run, possibly mid-save
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    killed = time.monotonic()
    try:
        procs[1].wait(timeout=90)
    except subprocess.TimeoutExpired:
        procs[1].kill()
        pytest.fail("the surviving worker hung:\n" + _logs(tmp_path, "first"))
    log = (tmp_path / "first-worker1.log").read_text()
    assert procs[1].returncode == 2, log[-3000:]
    assert "error: lost contact with another worker" in log and "--resume" in log
    assert time.monotonic() - killed < 60
    assert index.exists(), _logs(tmp_path, "first")

    procs = _start_workers(out, tmp_path, args, "second", resume=True)
    _wait_all(procs, tmp_path, "second")
    log = (tmp_path / "second-worker0.log").read_text()
    start = int(log.split("[train] steps ")[1].split("->")[0])
    assert 0 < start < steps and start % 20 == 0, log
    assert f"steps {start}->{steps}" in (tmp_path / "second-worker1.log").read_text()
    if not extra:  # (with expert parallelism each worker holds other experts)
        w0, w1 = _weights(tmp_path / "second-w0.npz"), _weights(tmp_path / "second-w1.npz")
        assert all(np.array_equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert sorted(_losses(out)) == list(range(1, steps + 1))
