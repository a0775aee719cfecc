"""The best validation's weights (`train.keep_best`): what `eval`, `generate`, `export`
and `serve` load from a run that keeps them.

Each validation whose loss is below the best so far saves the model's weights (with
`train.ema_decay`, the average it validated) as the run's one best checkpoint,
`RUN/best/ckpt-STEP` (`RunLayout.best_checkpoint`: model only, written and replaced the
way every checkpoint is, so a kill leaves the old best or the new one). Its validation
loss is saved in the same checkpoint, beside the weights and the step. `checkpoints/`
keep the last weights and the optimizer for `--resume`, which reads the best so far back
from `best/` so that a resumed run replaces it only with a better one (also a best saved
after the checkpoint it resumes from, by a run killed between the two). Which checkpoint
a run's model is loaded from is decided in one place: `RunLayout.weights_checkpoint`.
"""

from __future__ import annotations

import contextlib
import math
import time

import tensorflow as tf

from deepseek_tf.training.signals import signals_deferred

__all__ = ["BestWeights"]


class BestWeights:
    """Keeps the weights of the lowest validation loss of a run (`train.keep_best`).

    Args:
        run: the run's `RunLayout`.
        model: the model being trained.
        enabled: `train.keep_best`; False makes `offer` a no-op (the last weights are the
            run's model).
        chief: False on a non-chief worker (it takes part in the collective save, which
            writes nothing of its own; see `RunCheckpoint`).
        averaged: a context in which the model holds the weights that were validated
            (`WeightAverage.averaged`).
        record: the run's `RunRecorder` (logs and `metrics.jsonl` entries), or None.

    The best so far is read back from the run's `best/` (a resumed run's; a new run has
    none: `RunLayout.check_new` refuses a directory holding one).

    Examples:
        best = BestWeights(run, model, enabled=True, averaged=average.averaged)
        best.offer(step, validate()["loss"])  # saves when the loss is below the best so far
    """

    def __init__(self, run, model, enabled: bool, *, chief=True, averaged=None, record=None):
        self.enabled, self.record = enabled, record
        self.averaged = averaged or contextlib.nullcontext
        self.step, self.val_loss, self.path = None, math.inf, None
        self.checkpoint = None
        if enabled:
            self.loss = tf.Variable(math.inf, dtype=tf.float64, trainable=False, name="val_loss")
            extra = {"val_loss": self.loss}
            self.checkpoint = run.best_checkpoint(model, chief=chief, extra=extra)
            if record is not None:
                self.checkpoint.log = record.log
            self._read_back()

    def _read_back(self) -> None:
        """The best so far from the run's best checkpoint (`--resume`); none: +inf. Only
        its step and validation loss are read: the model keeps the weights it resumes
        from. A corrupt best checkpoint is named, as `RunCheckpoint.restore` names one."""
        if not self.checkpoint.latest:
            return
        state = tf.train.Checkpoint(step=self.checkpoint.step, val_loss=self.loss)

        def read_one(prefix):
            state.read(prefix).expect_partial().assert_existing_objects_matched()
            return prefix

        candidates = self.checkpoint.candidates()
        self.path = self.checkpoint.restore_first_readable(candidates, read_one)
        self.step, self.val_loss = int(self.checkpoint.step.numpy()), float(self.loss.numpy())

    def offer(self, step: int, val_loss: float) -> bool:
        """Saves the model as the best when `val_loss` (of `step`) is below the best so
        far; returns whether it did. A non-finite loss never is."""
        if not self.enabled or not val_loss < self.val_loss:  # NaN compares False
            return False
        started = time.perf_counter()
        self.loss.assign(val_loss)
        # SIGTERM/Ctrl-C during the write: after it; the validated (averaged) weights
        with signals_deferred(), self.averaged():
            self.path = self.checkpoint.save(step)
        self.step, self.val_loss = step, val_loss
        if self.record is not None:
            self.record.best(step, val_loss, self.path, time.perf_counter() - started)
        return True

    def summary(self) -> dict:
        """Which weights are the run's model, for the training summary: `weights` is
        "best" (with `best_checkpoint`, `best_val_loss`, `best_val_step`) or "last"."""
        if self.step is None:
            return {"weights": "last"}
        return {
            "weights": "best",
            "best_checkpoint": self.path,
            "best_val_loss": self.val_loss,
            "best_val_step": self.step,
        }
