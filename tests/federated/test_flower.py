"""The Flower engine: the simulation gives the in-process engine's rounds, and a real
deployment -- one SuperLink and SuperNodes on 127.0.0.1 started with Flower's own
commands -- trains a run, going on without a SuperNode killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from deepseek_tf.api import federated  # noqa: E402
from deepseek_tf.config.loader import apply_overrides, load_config  # noqa: E402
from deepseek_tf.federated import flower_project_dir  # noqa: E402
from deepseek_tf.rundir import RunDir  # noqa: E402

pytestmark = pytest.mark.flower
BIN = Path(sys.executable).parent


def _config(*extra):
    small = [
        "federated.clients=2",
        "federated.clients_per_round=2",
        "federated.rounds=2",
        "federated.local_steps=2",
        "federated.partition=iid",
        "federated.eval_every=1",
    ]
    return apply_overrides(load_config("tiny"), [*small, *extra])  # fmt: skip


def _rounds(run):
    return [e for e in RunDir(run).metrics.read() if "round" in e and "event" not in e]


def test_the_simulation_equals_the_in_process_engine(tmp_path):
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    federated(_config(), out=tmp_path / "inprocess", verbose=0)
    federated(_config("federated.engine=flower"), out=tmp_path / "flower", verbose=0)
    ours, flower = _rounds(tmp_path / "inprocess"), _rounds(tmp_path / "flower")
    assert [r["round"] for r in flower] == [1, 2] and all(r["answered"] == 2 for r in flower)
    for a, b in zip(ours, flower):
        assert a["client_losses"] == b["client_losses"]  # bit for bit: the same code ran
        assert a["val_loss"] == b["val_loss"]


def _flwr_env(home):
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n[superlink.deploy]\n'
        'address = "127.0.0.1:9190"\ninsecure = true\n'
    )
    return env


def _flwr_json(env, *args):
    done = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}


def test_a_deployment_with_three_supernodes_survives_losing_one(tmp_path):
    run = tmp_path / "run"
    config = _config("federated.clients=3", "federated.clients_per_round=3",
                     "federated.rounds=4", "federated.min_clients=1",
                     "federated.round_timeout=90")  # fmt: skip
    federated(config, out=run, verbose=0, prepare_only=True)
    env = _flwr_env(tmp_path / "flwr")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = [
        subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                "9190",
                "--disable-runtime-dependency-installation",
            ],
            env=env,
            stdout=open(logs / "link.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
    ]
    for k in range(3):
        procs.append(subprocess.Popen(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", "127.0.0.1:9190",
             "--port", str(9194 + k), "--max-wait-time", "60",
             "--node-config", f"partition-id={k}"],
            env=env, stdout=open(logs / f"node{k}.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            nodes = _flwr_json(env, "supernode", "ls").get("nodes", [])
            if sum(n.get("status") == "online" for n in nodes) >= 3:
                break
            time.sleep(1)
        submitted = _flwr_json(env, "run", str(flower_project_dir()), "-c",
                               f'run-dir="{run.resolve()}"')  # fmt: skip
        run_id = submitted["run-id"]
        while not (run / "checkpoints" / "ckpt-1.index").exists():  # round 1 done
            assert time.monotonic() < deadline + 300, "no round finished"
            time.sleep(0.5)
        procs[3].send_signal(signal.SIGKILL)  # the SuperNode of client 2
        status = ""
        while not status.startswith("finished"):
            assert time.monotonic() < deadline + 600, f"run stuck in {status!r}"
            runs = _flwr_json(env, "ls", "--run-id", str(run_id)).get("runs", [{}])
            status = runs[0].get("status", "")
            time.sleep(2)
        assert status == "finished:completed", status
    finally:
        for proc in procs[::-1]:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["answered"] == 3 and rounds[-1]["answered"] == 2  # client 2 is gone
    assert "2" not in rounds[-1]["client_losses"]
    assert RunDir(run).load()[0] is not None  # a normal run
