"""Checkpoints of a run: weights, optimizer state and step, config beside them.

`tf.train.CheckpointManager` writes the data files first and then replaces the
small `checkpoint` index atomically, so a run killed mid-save still points at
the previous, complete checkpoint. It keeps the newest `keep` checkpoints.
"""

from __future__ import annotations

import shutil
import tempfile
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
        chief: False on a non-chief worker of a multi-worker job: it takes part in
            every (collective) save but writes to a private temporary directory,
            made for that save and deleted right after it (only a worker killed
            mid-save leaves one behind); restores read the chief's directory.
    """

    def __init__(self, run_dir, model, optimizer=None, keep: int = 3, *, chief: bool = True):
        self.directory = Path(run_dir) / CHECKPOINT_DIR
        self.chief = chief
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        objects = {"model": model, "step": self.step}
        if optimizer is not None:
            objects["optimizer"] = optimizer
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = (
            tf.train.CheckpointManager(
                self.checkpoint, str(self.directory), max_to_keep=keep, checkpoint_name="ckpt"
            )
            if chief
            else None
        )

    @property
    def latest(self) -> str | None:
        if self.chief:
            return self.manager.latest_checkpoint
        return tf.train.latest_checkpoint(str(self.directory))

    def save(self, step: int) -> str:
        self.step.assign(step)
        if self.chief:
            return self.manager.save(checkpoint_number=step)
        # Non-chief: the same collective save, into a throw-away directory.
        scratch = tempfile.mkdtemp(prefix="deepseek-tf-worker-ckpt-")
        try:
            self.checkpoint.write(str(Path(scratch) / f"ckpt-{step}"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return str(self.directory / f"ckpt-{step}")  # the chief's copy is the one that counts

    def close(self) -> None:
        """Nothing left to clean up (kept for callers that close checkpoints)."""

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
