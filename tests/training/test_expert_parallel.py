"""Expert parallelism (`runtime.expert_parallel`): routed experts sharded over replicas.

Real `tf.distribute` replicas: logical CPU devices in a subprocess (they must be set
before TensorFlow starts), and two `MultiWorkerMirroredStrategy` workers on 127.0.0.1.
"""

import json
import subprocess
import sys

import pytest
from test_multi_worker import (
    TIMEOUT,
    _env,
    _losses,
    _reference_run,
    _start_workers,
    _wait_all,
)

from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError

EP_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
devices = int(sys.argv[2])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)

from deepseek_tf.api import train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.rundir import RunDir

out, shards, steps = Path(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4])
base = [f"train.steps={steps}", f"train.eval_every={steps // 2}", "train.log_every=1",
        f"train.checkpoint_every={steps // 2}", "train.batch_size=4", "runtime.jit_compile=false"]
ep = base + ["runtime.strategy=mirrored", f"runtime.expert_parallel={shards}"]


def config(overrides):
    return apply_overrides(load_config("tiny-moe"), overrides)


def losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in lines]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}, [
        e["val_loss"] for e in entries if "val_loss" in e]


def weights(run):
    model, _ = RunDir(run).load()
    return {v.path.split("/", 1)[1]: v.numpy() for v in model.weights}


train(config(ep), out=out / "ep", verbose=0, sample_tokens=0)
train(config(base), out=out / "single", verbose=0, sample_tokens=0)
first = losses(out / "ep")
a, b = weights(out / "ep"), weights(out / "single")  # each loaded in one process
worst = max(float(np.abs(a[k] - b[k]).max()) for k in b)
errors = []
for bad, run, resume in (
    ([f"runtime.expert_parallel={2 * devices}"], out / "bad", False),  # N not dividing R
    (["runtime.expert_parallel=1"], out / "ep", True),  # resuming with another N
):
    try:
        train(config(ep[:-1] + bad), out=run, resume=resume, verbose=0, sample_tokens=0)
    except ConfigError as e:
        errors.append(str(e))
for path in (out / "ep" / "checkpoints").glob(f"ckpt-{steps}.*"):
    path.unlink()  # resume from the half-way checkpoint: the same steps again
train(config(ep), out=out / "ep", resume=True, verbose=0, sample_tokens=0)
print("RESULT", json.dumps({"ep": first, "single": losses(out / "single"),
      "resumed": losses(out / "ep"), "worst_weight": worst, "errors": errors,
      "experts": {k: a[k].shape[0] for k in a if k.endswith("experts_gate")}}))
"""


def _run_script(tmp_path, devices, shards, steps):
    done = subprocess.run(
        [sys.executable, "-c", EP_SCRIPT, str(tmp_path), str(devices), str(shards), str(steps)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ")[1].splitlines()[0])


def _check(result, steps):
    (ep, ep_val), (single, single_val) = result["ep"], result["single"]
    assert sorted(map(int, ep)) == list(range(1, steps + 1))
    for step, loss in single.items():  # same global batch, same update
        assert ep[step] == pytest.approx(loss, abs=1e-5), step
    assert ep_val == pytest.approx(single_val, abs=1e-5)
    assert result["worst_weight"] < 1e-5  # the sharded run loads whole in one process
    experts = result["experts"]  # every MoE layer's stacks saved with all 8 experts
    assert len(experts) == 3 and set(experts.values()) == {8}, experts
    resumed, _ = result["resumed"]
    for step in range(steps // 2 + 1, steps + 1):
        assert resumed[str(step)] == pytest.approx(ep[str(step)], abs=1e-6), step


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_two_shards_on_two_devices_train_save_load_and_resume_as_one_process(tmp_path):
    result = _run_script(tmp_path, devices=2, shards=2, steps=6)
    _check(result, 6)
    not_dividing, other_n = result["errors"]
    assert "runtime.expert_parallel: 4 does not divide the 2 replica(s)" in not_dividing
    assert "trained with 2, not 1" in other_n


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
@pytest.mark.parametrize("shards", [2, 4])
def test_shards_on_four_devices_match_one_process_for_20_steps(tmp_path, shards):
    """EP 4: one shard per replica; EP 2: two replicas hold each shard."""
    _check(_run_script(tmp_path, devices=4, shards=shards, steps=20), 20)


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_two_workers_with_two_shards_match_one_process_and_resume(tmp_path):
    """Two `deepseek-tf train` workers (TF_CONFIG, 127.0.0.1), each holding half the
    experts, against one process fed the union of their batches; both workers resume
    from the half-way checkpoint."""
    out = tmp_path / "run"
    common = ["train.eval_every=0", "train.log_every=1", "train.batch_size=4", "train.steps=6"]
    ep = [*common, "runtime.expert_parallel=2", "train.checkpoint_every=3"]
    sets = [x for item in ep for x in ("--set", item)]
    _wait_all(_start_workers(out, tmp_path, sets, "ep", preset="tiny-moe"), tmp_path, "ep")
    ref = _reference_run(tmp_path, "tiny-moe", [x for item in common for x in ("--set", item)])
    first, single = _losses(out), _losses(ref)
    assert sorted(first) == sorted(single) == list(range(1, 7))
    for step in first:
        assert first[step] == pytest.approx(single[step], abs=1e-5), step
    for path in (out / "checkpoints").glob("ckpt-6.*"):
        path.unlink()
    _wait_all(_start_workers(out, tmp_path, [], "resumed", resume=True), tmp_path, "resumed")
    resumed = _losses(out)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(first[step], abs=1e-6), step


@pytest.mark.parametrize(
    "preset,overrides,message",
    [
        ("tiny", ["runtime.expert_parallel=2"], "the model has no routed experts"),
        ("tiny-moe", ["runtime.expert_parallel=3"], "3 does not divide the 8 routed experts"),
        ("tiny-moe", ["runtime.expert_parallel=0"], "runtime.expert_parallel"),
        (
            "tiny-moe",
            ["runtime.expert_parallel=2", "train.precision=mixed_float16"],
            "mixed_float16",
        ),
    ],
)
def test_bad_expert_parallel_settings_are_one_line_errors(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config(preset), overrides)


def test_one_process_has_no_replicas_to_shard_over(tmp_path):
    from deepseek_tf.api import train

    config = apply_overrides(load_config("tiny-moe"), ["runtime.expert_parallel=2"])
    with pytest.raises(ConfigError, match="does not divide the 1 replica"):
        train(config, out=tmp_path / "run", verbose=0, sample_tokens=0)
