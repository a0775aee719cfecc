"""`train.ema_decay`: the moving average of the weights is what validation, checkpoints and
`eval` see, training itself is unchanged, and `--resume` continues from the trained weights.

The reference is computed here, by hand, from a run without averaging: its weights after
every step (one checkpoint per step) folded into avg_1 = w_1, avg_k = d avg_(k-1) + (1-d) w_k.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from deepseek_tf.api import evaluate, federated, load, train
from deepseek_tf.config.loader import apply_overrides
from deepseek_tf.errors import ConfigError
from deepseek_tf.rundir import RunDir
from deepseek_tf.training.checkpoint import RunCheckpoint

DECAY = 0.8
STEPS = 4
EVAL_BATCHES = 16  # the first 16 validation batches, as `evaluate(max_batches=16)` reads them
EVERY_STEP = [f"train.steps={STEPS}", "train.log_every=1", "train.checkpoint_every=1"]


def _losses(run):
    return [e["loss"] for e in RunDir(run).metrics.read() if "loss" in e]


def _val_losses(run):
    return {e["step"]: e["val_loss"] for e in RunDir(run).metrics.read() if "val_loss" in e}


def _weights_at(run, step):
    """The model weights of checkpoint `ckpt-step` of `run`."""
    model, _ = load(run)
    RunCheckpoint(RunDir(run).checkpoint_dir, model).checkpoint.read(
        str(RunDir(run).checkpoint_dir / f"ckpt-{step}")
    ).expect_partial()
    return [np.array(w) for w in model.trainable_weights]


@pytest.fixture(scope="module")
def plain_and_averaged(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("ema")
    plain = apply_overrides(tiny_config, [*EVERY_STEP, "train.eval_every=0"])
    plain = apply_overrides(plain, [f"train.keep_checkpoints={STEPS}"])
    train(plain, out=root / "plain", verbose=0, sample_tokens=0)
    averaged = apply_overrides(tiny_config, [*EVERY_STEP, "train.eval_every=2"])
    averaged = apply_overrides(
        averaged, [f"train.ema_decay={DECAY}", f"train.eval_batches={EVAL_BATCHES}"]
    )
    train(averaged, out=root / "averaged", verbose=0, sample_tokens=0)
    return plain, root / "plain", averaged, root / "averaged"


def test_the_checkpoint_holds_the_average_and_training_is_unchanged(plain_and_averaged):
    _, plain_run, _, averaged_run = plain_and_averaged
    # Validating and saving swap the average in and out at every step: the trained weights
    # (and so the losses) must come back exactly.
    assert _losses(averaged_run) == _losses(plain_run)
    expected = _weights_at(plain_run, 1)
    for step in range(2, STEPS + 1):
        expected = [
            DECAY * a + (1 - DECAY) * w for a, w in zip(expected, _weights_at(plain_run, step))
        ]
    model, _ = load(averaged_run)  # what eval, generate, serve and export read
    got = [np.array(w) for w in model.trainable_weights]
    assert max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected)) < 1e-6
    trained = _weights_at(plain_run, STEPS)
    assert max(float(np.max(np.abs(g - t))) for g, t in zip(got, trained)) > 1e-4


def test_validation_is_the_average_as_eval_measures_it(plain_and_averaged):
    _, _, _, averaged_run = plain_and_averaged
    logged = _val_losses(averaged_run)
    assert sorted(logged) == [2, 4]
    measured = evaluate(averaged_run, batch_size=4, max_batches=EVAL_BATCHES)
    assert abs(measured["loss"] - logged[STEPS]) < 1e-5, json.dumps(measured)


def test_resume_continues_from_the_trained_weights(plain_and_averaged, tmp_path):
    _, _, averaged, averaged_run = plain_and_averaged
    run = tmp_path / "resumed"  # stopped after step 2 (an average of 2 steps), resumed
    train(apply_overrides(averaged, ["train.steps=2"]), out=run, verbose=0, sample_tokens=0)
    train(averaged, out=run, resume=True, verbose=0, sample_tokens=0)
    assert _losses(run) == pytest.approx(_losses(averaged_run), abs=1e-6)
    (model, _), (reference, _) = load(run), load(averaged_run)
    for a, b in zip(model.trainable_weights, reference.trainable_weights):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)


def test_bad_settings_are_one_line_errors(plain_and_averaged, tiny_config, tmp_path):
    plain, plain_run, _, _ = plain_and_averaged
    with pytest.raises(ConfigError, match=r"train.ema_decay: must be in \[0, 1\)"):
        apply_overrides(tiny_config, ["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="train.ema_decay: a moving average of bfloat16"):
        apply_overrides(tiny_config, ["train.ema_decay=0.9", "train.precision=bfloat16"])
    with pytest.raises(ConfigError, match="federated training does not keep a weight average"):
        federated(apply_overrides(tiny_config, ["train.ema_decay=0.9"]), out=tmp_path / "fed")
    assert not (tmp_path / "fed").exists()
    # Averaging cannot start mid-run: there is no average of the steps already taken.
    longer = apply_overrides(plain, [f"train.steps={STEPS + 2}", "train.ema_decay=0.9"])
    with pytest.raises(ConfigError, match="trained with 0 and resumes with 0.9"):
        train(longer, out=plain_run, resume=True, verbose=0, sample_tokens=0)


MIRRORED_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from deepseek_tf.api import load, train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.rundir import RunDir

base = ["train.steps=4", "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=2",
        "train.ema_decay=0.8"]
runs = {"one": ['runtime.devices=["/cpu:0"]', "runtime.strategy=one_device"],
        "two": ['runtime.devices=["/cpu:0","/cpu:1"]', "runtime.strategy=mirrored"]}
result = {}
for name, extra in runs.items():
    train(apply_overrides(load_config("tiny"), base + extra), out=sys.argv[1] + "/" + name,
          verbose=0, sample_tokens=0)
    entries = RunDir(sys.argv[1] + "/" + name).metrics.read()
    model, _ = load(sys.argv[1] + "/" + name)
    result[name] = {"losses": [e["loss"] for e in entries if "loss" in e],
                    "val": [e["val_loss"] for e in entries if "val_loss" in e],
                    "weights": [v.numpy() for v in model.weights]}
diff = max(float(np.max(np.abs(a - b)))
           for a, b in zip(result["one"]["weights"], result["two"]["weights"]))
print(json.dumps({"diff": diff, **{k: {"losses": v["losses"], "val": v["val"]}
                                    for k, v in result.items()}}))
"""


@pytest.mark.slow
def test_two_replicas_average_as_one_device(tmp_path):
    """MirroredStrategy (two logical CPUs, a subprocess): the average is swapped in and out
    of mirrored variables and equals the one-device run's."""
    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["one"]["losses"] == pytest.approx(out["two"]["losses"], abs=1e-5)
    assert out["one"]["val"] == pytest.approx(out["two"]["val"], abs=1e-5)
    assert out["diff"] < 1e-5
