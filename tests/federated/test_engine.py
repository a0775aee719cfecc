"""Federated runs end to end (in-process engine): the one-step equivalence, a client
failing, kill -9 of the server and --resume, bad options, and a run other commands take."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deepseek_tf.api import federated, load
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import apply_overrides, load_config, update_config
from deepseek_tf.data.pipeline import make_train_dataset
from deepseek_tf.federated.client import LocalTrainer
from deepseek_tf.models.builder import build_model
from deepseek_tf.rundir import RunDir
from deepseek_tf.training.optim import make_optimizer
from deepseek_tf.training.step import make_train_step

SMALL = ["federated.clients=4", "federated.clients_per_round=2", "federated.local_steps=2",
         "federated.eval_every=2", "federated.partition=iid"]  # fmt: skip


def _config(*extra):
    return apply_overrides(load_config("tiny"), [*SMALL, *extra])


def _rounds(run):
    return [e for e in RunDir(run).metrics.read() if "round" in e and "event" not in e]


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_one_client_one_step_is_one_centralised_step(tmp_path):
    config = _config("federated.clients=1", "federated.clients_per_round=1",
                     "federated.local_steps=1", "federated.rounds=1")  # fmt: skip
    federated(config, out=tmp_path / "fed", verbose=0)
    fed, tokenizer = load(tmp_path / "fed")
    # the same step, centrally: same init, a fresh AdamW at the constant client lr, the
    # client's first batch
    resolved = RunDir(tmp_path / "fed").read_config()
    central = build_model(resolved, seed=resolved.train.seed)
    t = update_config(
        resolved,
        train={"steps": 1, "warmup_steps": 0, "min_learning_rate": resolved.train.learning_rate},
    ).train
    step = make_train_step(central, make_optimizer(t, central), clip_norm=t.clip_norm,
                           jit_compile=False)  # fmt: skip
    client = str(tmp_path / "fed/clients/client_000.txt")
    data = update_config(resolved, data={"files": [client]}).data
    step(*next(iter(make_train_dataset(data, tokenizer, t.batch_size))))
    for a, b in zip(fed.weights, central.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_a_failing_client_does_not_stop_the_round(tmp_path, monkeypatch, capsys):
    run = LocalTrainer.run

    def flaky(self, weights, path, round_index):
        if path.endswith("client_001.txt"):
            raise RuntimeError("the client's process died")
        return run(self, weights, path, round_index)

    monkeypatch.setattr(LocalTrainer, "run", flaky)
    config = _config("federated.rounds=4", "federated.clients_per_round=4")
    federated(config, out=tmp_path / "fed", verbose=1)
    out = capsys.readouterr().out
    assert "client 1 failed in round 1" in out and "the round goes on" in out
    rounds = _rounds(tmp_path / "fed")
    assert len(rounds) == 4 and all(r["answered"] == 3 for r in rounds)
    assert np.isfinite(rounds[-1]["val_loss"])


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_kill_9_of_the_server_then_resume(tmp_path):
    args = ["--preset", "tiny", *[x for s in SMALL for x in ("--set", s)], "--rounds", "30"]
    reference = tmp_path / "reference"
    assert main(["federated", "--out", str(reference), *args]) == 0
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "deepseek_tf.cli.main", "federated", "--out", str(run), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "ckpt-4.index").exists():
        assert proc.poll() is None and time.time() < deadline, "finished before the kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["federated", "--out", str(run), "--resume"]) == 0
    got, want = _rounds(run), _rounds(reference)
    assert [r["round"] for r in got] == list(range(1, 31))
    for a, b in zip(got, want):
        assert a["clients"] == b["clients"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_a_federated_run_is_a_run(tmp_path, capsys):
    config = _config("federated.rounds=2", "federated.secure_aggregation=true",
                     "federated.dp_clip=1.0", "federated.dp_noise_multiplier=0.5")  # fmt: skip
    federated(config, out=tmp_path / "fed", verbose=0)
    rounds = _rounds(tmp_path / "fed")
    assert rounds[-1]["epsilon"] > rounds[0]["epsilon"] > 0 and rounds[-1]["delta"] == 1e-5
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in rounds)
    assert main(["eval", str(tmp_path / "fed"), "--max-batches", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert main(["generate", str(tmp_path / "fed"), "--prompt", "A", "--max-new-tokens", "3"]) == 0


@pytest.mark.parametrize(
    "args,match",
    [
        (["--partition", "by-speaker", "--clients", "500"], "speaking roles"),
        (["--clients", "4", "--clients-per-round", "5"], "federated.clients_per_round: 5"),
        (["--dp-noise-multiplier", "1.0"], "--dp-noise-multiplier needs --dp-clip"),
        (["--partition", "iid", "--clients", "40000"], "too few for one training"),
        (["--algorithm", "fedfancy"], "--algorithm 'fedfancy'"),
        (["--engine", "magic"], "federated.engine"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, match):
    code = main(["federated", "--preset", "tiny", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
