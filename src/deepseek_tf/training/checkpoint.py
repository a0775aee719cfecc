"""Checkpoints of a run: weights, optimizer state and step, config beside them.

`tf.train.CheckpointManager` writes the data files first and then replaces the
small `checkpoint` index atomically, so a run killed mid-save still points at
the previous, complete checkpoint. It keeps the newest `keep` checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from deepseek_tf.errors import RunDirError

CHECKPOINT_DIR = "checkpoints"


class RunCheckpoint:
    """Saves and restores `(model, optimizer, step)` under `run_dir/checkpoints`.

    Args:
        run_dir: the run directory.
        model: the Keras model.
        optimizer: the optimizer (None to save/restore weights only).
        keep: number of checkpoints kept.
    """

    def __init__(self, run_dir, model, optimizer=None, keep: int = 3):
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        objects = {"model": model, "step": self.step}
        if optimizer is not None:
            objects["optimizer"] = optimizer
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.directory), max_to_keep=keep, checkpoint_name="ckpt"
        )

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> str:
        self.step.assign(step)
        return self.manager.save(checkpoint_number=step)

    def restore(self, path: str | None = None, weights_only: bool = False) -> int:
        """Restores `path` (default: the latest); returns its step."""
        path = path or self.latest
        if path is None:
            raise RunDirError(f"{self.directory}: no checkpoint to restore")
        try:
            status = self.checkpoint.restore(path)
            if weights_only:
                status.expect_partial()
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunDirError(f"{path}: checkpoint does not match the model ({first})") from None
        return int(self.step.numpy())


def restore_weights(run_dir, model) -> int:
    """Loads the latest checkpoint's weights into `model`; returns its step."""
    return RunCheckpoint(run_dir, model).restore(weights_only=True)
