"""`train.keep_best`: a validation that beats the best so far saves the model to `RUN/best/`,
and the run's model (`load`, so `eval`, `generate`, `export`, `serve`) is those weights;
`checkpoints/` keep the last weights for `--resume`, which keeps the best so far.

Validation is made worse on purpose by adding to the real validation loss of chosen
evaluations (`_scripted`): the best step is then known to be an earlier one, and the
loaded model's real validation loss must equal the recorded best.
"""

import contextlib
import shutil

import numpy as np
import pytest

from deepseek_tf.api import load, train
from deepseek_tf.config.loader import apply_overrides, load_config, update_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.rundir import RunDir
from deepseek_tf.training import batches
from deepseek_tf.training.evaluate import evaluate
from deepseek_tf.training.report import summary_lines
from deepseek_tf.training.trainer import Trainer

EVERY_2 = ["train.steps=6", "train.eval_every=2", "train.checkpoint_every=2",
           "train.keep_checkpoints=10", "train.log_every=1", "train.eval_batches=2"]  # fmt: skip
WORSE = 10.0  # added to an evaluation's loss: worse than any real one


@contextlib.contextmanager
def _scripted(offsets):
    """`Trainer.validate` returns the real result plus `offsets[i]` on its i-th call."""
    real, calls = Trainer.validate, iter(offsets)

    def validate(self):
        result = dict(real(self))
        result["loss"] += next(calls)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "validate", validate)
        yield


def _flat(model) -> np.ndarray:
    return np.concatenate([np.asarray(w).ravel() for w in model.weights])


def _last_weights_config(run):
    """The run's own config with `train.keep_best` off."""
    return update_config(RunDir(run).read_config(), train={"keep_best": False})


def _checkpoint_weights(run, step) -> np.ndarray:
    """The weights of `checkpoints/ckpt-step` (the last weights loaded, then that one)."""
    model, _ = RunDir(run).load(_last_weights_config(run))
    prefix = RunDir(run).checkpoint_dir / f"ckpt-{step}"
    RunDir(run).checkpoint(model).restore(str(prefix), weights_only=True)
    return _flat(model)


def _val_loss(run) -> float:
    """The real validation loss of the run's model, read as training validates."""
    config = RunDir(run).read_config()
    model, tokenizer = load(run)
    dataset = batches.validation_batches(config, tokenizer)
    return evaluate(model, dataset, max_batches=config.train.eval_batches)["loss"]


def _best_events(run) -> list[dict]:
    return [e for e in RunDir(run).metrics.read() if e.get("event") == "best"]


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, tiny_config):
    """6 steps, evaluations at 2, 4, 6; the last one made worse than any real loss."""
    config = apply_overrides(tiny_config, [*EVERY_2, "train.keep_best=true"])
    run = tmp_path_factory.mktemp("keep_best") / "run"
    with _scripted([0.0, 0.0, WORSE]):
        summary = train(config, out=run, verbose=0, sample_tokens=0)
    return config, run, summary


def test_the_model_is_the_best_validations_weights(best_run):
    config, run, summary = best_run
    vals = {e["step"]: e["val_loss"] for e in RunDir(run).metrics.read() if "val_loss" in e}
    best_step = min(vals, key=vals.get)
    assert best_step in (2, 4) and vals[6] > vals[best_step]  # worse after improving
    assert summary["weights"] == "best" and summary["best_val_step"] == best_step
    assert summary["best_val_loss"] == pytest.approx(vals[best_step])
    assert summary["best_checkpoint"] == str(run / "best" / f"ckpt-{best_step}")
    assert [e["step"] for e in _best_events(run)][-1] == best_step
    assert sorted(p.name for p in (run / "best").glob("ckpt-*.index")) == [
        f"ckpt-{best_step}.index"
    ]
    # the loaded model: the best step's weights, not the last; its loss is the recorded best
    loaded = _flat(load(run)[0])
    np.testing.assert_array_equal(loaded, _checkpoint_weights(run, best_step))
    assert not np.array_equal(loaded, _checkpoint_weights(run, 6))
    assert _val_loss(run) == pytest.approx(vals[best_step], rel=1e-5)
    # the last weights stay for --resume
    assert (run / "checkpoints" / "ckpt-6.index").exists() and summary["checkpoint"].endswith(
        "ckpt-6"
    )
    from deepseek_tf.api.info import training_state

    assert training_state(RunDir(run))["weights"] == "best"  # what `info` says
    lines = "\n".join(summary_lines(summary))
    assert f"model          best at step {best_step}, val loss {vals[best_step]:.4f}" in lines


def test_init_from_starts_from_the_best(best_run):
    """`train --init-from RUN` fine-tunes the weights the run's `eval` uses: the best."""
    from deepseek_tf.convert.init_from import load_initial_weights
    from deepseek_tf.models.builder import build_model

    config, run, summary = best_run
    model = build_model(RunDir(run).read_config())
    line = load_initial_weights(model, run)
    assert line == f"{run} (step {summary['best_val_step']})"
    np.testing.assert_array_equal(_flat(model), _flat(load(run)[0]))


def test_resume_keeps_the_best_so_far(best_run, tmp_path):
    config, source, first = best_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = _flat(load(run)[0])
    longer = apply_overrides(config, ["train.steps=10"])  # evaluations at 8 and 10
    with _scripted([WORSE, WORSE]):
        summary = train(longer, out=run, resume=True, verbose=0, sample_tokens=0)
    assert summary["step"] == 10 and summary["best_val_step"] == first["best_val_step"]
    assert summary["best_val_loss"] == pytest.approx(first["best_val_loss"])
    np.testing.assert_array_equal(_flat(load(run)[0]), before)  # not replaced by a worse one
    assert (run / "checkpoints" / "ckpt-10.index").exists()  # --resume continues from these
    with _scripted([-WORSE]):  # a better one replaces it
        better = train(apply_overrides(config, ["train.steps=12"]), out=run, resume=True,
                       verbose=0, sample_tokens=0)  # fmt: skip
    assert better["best_val_step"] == 12 and better["weights"] == "best"
    np.testing.assert_array_equal(_flat(load(run)[0]), _checkpoint_weights(run, 12))


def test_keep_best_without_validation_is_a_one_line_error(tiny_config):
    with pytest.raises(ConfigError, match=r"^train\.keep_best: .*train\.eval_every=0") as error:
        apply_overrides(tiny_config, ["train.keep_best=true", "train.eval_every=0"])
    assert "\n" not in str(error.value)
    # a preset's keep_best is on, and does nothing when the user turns validation off
    preset = load_config("shakespeare-char")
    assert preset.train.keep_best and preset.train.eval_every
    assert apply_overrides(preset, ["train.eval_every=0"]).train.keep_best


def test_without_keep_best_the_run_loads_its_last_weights(best_run, tmp_path):
    config, kept, _ = best_run
    plain = apply_overrides(config, ["train.keep_best=false"])
    run = tmp_path / "plain"
    with _scripted([0.0, 0.0, WORSE]):
        summary = train(plain, out=run, verbose=0, sample_tokens=0)
    assert summary["weights"] == "last" and "best_checkpoint" not in summary
    assert not (run / "best").exists() and not _best_events(run)
    np.testing.assert_array_equal(_flat(load(run)[0]), _checkpoint_weights(run, 6))
    from deepseek_tf.api.info import training_state

    assert training_state(RunDir(run))["weights"] == "last"  # what `info` says
    lines = "\n".join(summary_lines(summary))
    assert "model          the last weights" in lines
    # the one place that decides: a keep_best run whose config turns it off loads the last
    model, _ = RunDir(kept).load(_last_weights_config(kept))
    np.testing.assert_array_equal(_flat(model), _checkpoint_weights(kept, 6))
