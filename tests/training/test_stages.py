"""`train.stages`: progressive training is one run (one optimizer, one schedule, one
history) on batches of each stage's shape, resumable inside any stage."""

import shutil

import numpy as np
import pytest

from deepseek_tf.api import load, train
from deepseek_tf.config.loader import load_config, update_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.rundir import RunDir

STAGES = ("steps=4,seq_len=8,batch_size=6", "steps=6")  # then data.seq_len 16, batch 4


def _config(**train):
    base = {"steps": 10, "stages": STAGES, "eval_every": 0, "log_every": 1}
    return update_config(load_config("tiny"), train={**base, **train})


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A staged 10-step run checkpointed at every step."""
    run = tmp_path_factory.mktemp("stages") / "run"
    train(_config(checkpoint_every=1, keep_checkpoints=10), out=run, verbose=0, sample_tokens=0)
    return run


def _weights(run):
    model, _ = load(run)
    return {v.path.split("/", 1)[1]: v.numpy() for v in model.weights}  # without the model


def test_each_stage_trains_on_its_shape_in_one_history(staged):
    entries = [e for e in RunDir(staged).metrics.read() if "loss" in e]
    assert [e["step"] for e in entries] == list(range(1, 11))
    assert [e["tokens"] for e in entries] == [6 * 8] * 4 + [4 * 16] * 6


@pytest.mark.parametrize("crashed_after", [2, 5])  # inside the first and the second stage
def test_a_run_resumed_inside_a_stage_ends_where_the_whole_run_did(
    staged, tmp_path, crashed_after, capsys
):
    run = tmp_path / "run"
    shutil.copytree(staged, run)
    for path in (run / "checkpoints").glob("ckpt-*"):  # as if it stopped after that step
        if int(path.name.split(".")[0].split("-")[1]) > crashed_after:
            path.unlink()
    (run / "checkpoints" / "checkpoint").write_text("lost")
    summary = train(_config(checkpoint_every=1, keep_checkpoints=10), out=run, resume=True,
                    verbose=1, sample_tokens=0)  # fmt: skip
    assert f"(step {crashed_after} of 10)" in capsys.readouterr().out
    assert summary["step"] == 10
    whole, resumed = _weights(staged), _weights(run)
    for name, value in whole.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (("steps=4,seq_len=8", "steps=5"), r"add up to 9, not train.steps=10"),
        (("steps=4,seq_len=64", "steps=6"), r"stages\[0\]: sequences of 64 tokens exceed"),
        (("steps=4,d_model=64", "steps=6"), r"stages\[0\]: 'd_model' cannot change"),
        (("steps=4,seq_len=0", "steps=6"), r"stages\[0\]: seq_len must be a positive integer"),
        (("seq_len=8", "steps=10"), r"stages\[0\]: give its steps"),
    ],
)
def test_bad_stages_are_refused_naming_the_stage(stages, message):
    with pytest.raises(ConfigError, match=message):
        _config(stages=stages)


def test_other_loops_leave_the_stages_to_train(tmp_path):
    """A staged run's config fine-tunes (compress) with its own steps; `federated`, whose
    clients train federated.local_steps a round, refuses stages before writing anything."""
    from deepseek_tf import api
    from deepseek_tf.compress.finetune import finetune_schedule

    staged = _config()
    assert finetune_schedule(staged, 3, 1e-3).steps == 3
    with pytest.raises(ConfigError, match="train.stages: progressive training is `train`'s"):
        api.federated(staged, out=tmp_path / "fed", clients=2, rounds=1)
    assert not (tmp_path / "fed").exists()
