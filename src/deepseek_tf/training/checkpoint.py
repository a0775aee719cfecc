"""Checkpoints of a run: weights, optimizer state and step, robust to being killed.

`tf.train.Checkpoint.write` puts the tensors into a `ckpt-N_temp*` directory, merges them
into `ckpt-N.data-*` and `ckpt-N.index`, and `tf.train.CheckpointManager` then replaces the
small `checkpoint` index file atomically. A process killed at any moment leaves either the
previous complete checkpoint or the new one, plus perhaps a stale `_temp` directory (removed
here) or an index file that lags behind the `ckpt-N` files on disk. So the index file is
only a hint: the checkpoint restored is the newest one on disk that reads back, and a
checkpoint that does not (a truncated `.data` file, a garbled `.index`) is reported by
name and skipped for the one before it. Corruption is told apart from a checkpoint that
reads fine but does not fit the model.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import tensorflow as tf

from deepseek_tf.errors import RunDirError
from deepseek_tf.generation import decode_layout

CHECKPOINT_NAME = "ckpt"
INDEX_FILE = "checkpoint"  # tf.train.CheckpointManager's index
_NUMBERED = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)\.index$")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checkpoints_on_disk(directory) -> list[str]:
    """Prefixes of the `ckpt-N` checkpoints with an index file, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    numbered = []
    for path in directory.iterdir():
        match = _NUMBERED.match(path.name)
        if match:
            numbered.append((int(match.group(1)), str(directory / f"{CHECKPOINT_NAME}-{match[1]}")))
    return [prefix for _, prefix in sorted(numbered)]


def unreadable_reason(prefix: str) -> str | None:
    """Why checkpoint `prefix` cannot be read back (naming the file), or None if it can.

    Reads every tensor, which verifies TensorFlow's per-tensor checksums.
    """
    name = Path(prefix).name
    try:
        reader = tf.train.load_checkpoint(prefix)
    except Exception as e:  # noqa: BLE001 - any failure to open the index is corruption here
        return f"{name}.index is unreadable ({_first_line(e)})"
    try:
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - IndexError, DataLossError, ...: all corruption
        data = sorted(p.name for p in Path(prefix).parent.glob(f"{name}.data-*"))
        return f"{', '.join(data) or name + '.data-*'} is truncated or corrupt ({_first_line(e)})"
    return None


def _write_index(directory: Path, prefixes: list[str]) -> None:
    """Atomically writes the `checkpoint` index file (a `CheckpointState` in protobuf text
    format) listing `prefixes`, the last one the newest."""
    names = [Path(p).name for p in prefixes]
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{name}"' for name in names]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, directory / INDEX_FILE)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RunCheckpoint:
    """Saves and restores `(model, optimizer, step)` in a run's checkpoint directory.

    Args:
        directory: the checkpoint directory (`RunDir.checkpoint_dir`).
        model: the Keras model.
        optimizer: the optimizer (None to save/restore weights only).
        keep: number of checkpoints kept.
        chief: False on a non-chief worker of a multi-worker job: it takes part in
            every (collective) save but writes to a private temporary directory,
            made for that save and deleted right after it; restores read the chief's
            directory. Only the chief repairs the directory.
        log: where notes about skipped or repaired checkpoints go (default stderr).
        extra: more `{name: trackable}` saved beside them (e.g. the expert shards'
            optimizer state, `expert_optimizer`), or None.
    """

    def __init__(
        self,
        directory,
        model,
        optimizer=None,
        keep: int = 3,
        *,
        chief: bool = True,
        log=_stderr,
        extra=None,
    ):
        self.directory = Path(directory)
        self.model = model
        self.chief = chief
        self.log = log
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        objects = {"model": model, "step": self.step}
        if optimizer is not None:
            objects["optimizer"] = optimizer
        objects.update(extra or {})
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.keep = keep
        self._manager = None
        self.unreadable: list[str] = []  # prefixes the last restore skipped as corrupt

    @property
    def manager(self) -> tf.train.CheckpointManager:
        """The chief's manager (made on first save, after the directory is repaired)."""
        if self._manager is None:
            self.repair()
            self._manager = tf.train.CheckpointManager(
                self.checkpoint,
                str(self.directory),
                max_to_keep=self.keep,
                checkpoint_name=CHECKPOINT_NAME,
            )
        return self._manager

    def candidates(self) -> list[str]:
        """Checkpoints to restore from, newest first."""
        return checkpoints_on_disk(self.directory)[::-1]

    @property
    def latest(self) -> str | None:
        found = self.candidates()
        return found[0] if found else None

    def repair(self) -> None:
        """Removes stale `ckpt-N_temp*` directories and rewrites an index file that is
        missing, garbled or behind the checkpoints on disk (chief only)."""
        if not self.chief or not self.directory.is_dir():
            return
        for stale in self.directory.glob(f"{CHECKPOINT_NAME}-*_temp*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
            self.log(f"[checkpoint] removed {stale.name}, left by a save that was interrupted")
        on_disk = checkpoints_on_disk(self.directory)
        if not on_disk:
            return
        try:
            state = tf.train.get_checkpoint_state(str(self.directory))
        except Exception:  # noqa: BLE001 - a garbled index file
            state = None
        listed = list(state.all_model_checkpoint_paths) if state else []
        if state is None or Path(state.model_checkpoint_path).name != Path(on_disk[-1]).name:
            _write_index(self.directory, on_disk)
            if listed or (self.directory / INDEX_FILE).exists():
                self.log(f"[checkpoint] index file rewritten: newest is {Path(on_disk[-1]).name}")

    def save(self, step: int) -> str:
        """Saves the checkpoint of `step`; returns its prefix.

        Raises:
            ValueError: the model is in the decode layout (its kernels transposed, a square
                one indistinguishable from the original once saved).
        """
        if decode_layout.applied(self.model):
            raise ValueError(
                "the model is in the decode layout (kernels held (out, in)): "
                "generation.decode_layout.restore(model) before saving it"
            )
        self.step.assign(step)
        if self.chief:
            return self.manager.save(checkpoint_number=step)
        # Non-chief: the same collective save, into a throw-away directory.
        scratch = tempfile.mkdtemp(prefix="deepseek-tf-worker-ckpt-")
        try:
            self.checkpoint.write(str(Path(scratch) / f"{CHECKPOINT_NAME}-{step}"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return str(self.directory / f"{CHECKPOINT_NAME}-{step}")  # the chief's copy counts

    def restore(self, path: str | None = None, weights_only: bool = False) -> int:
        """Restores `path`, or the newest checkpoint that reads back; returns its step.

        Raises:
            RunDirError: no checkpoint at all, none readable (each named with its
                problem), or one that reads but does not match the model.
        """

        def restore_one(prefix):
            status = self.checkpoint.restore(prefix)
            if weights_only:
                status.expect_partial()
            status.assert_existing_objects_matched()
            return int(self.step.numpy())

        return self.restore_first_readable([path] if path else self.candidates(), restore_one)

    def restore_first_readable(self, candidates, restore_one) -> int:
        """Runs `restore_one(prefix)` on the newest of `candidates` that reads back and
        returns its result: an unreadable checkpoint is named, set aside in
        `self.unreadable` and the one before it tried; one that reads but fails is the
        wrong checkpoint for the model (`RunDirError`)."""
        if not candidates:
            raise RunDirError(f"{self.directory}: no checkpoint to restore")
        skipped, self.unreadable = [], []
        for prefix in candidates:
            try:
                return restore_one(prefix)
            except Exception as e:  # noqa: BLE001 - told apart below
                reason = unreadable_reason(prefix)
                if reason is None:  # it reads fine: it is the wrong checkpoint for the model
                    raise RunDirError(
                        f"{prefix}: checkpoint does not match the model ({_first_line(e)})"
                    ) from None
                skipped.append(reason)
                self.unreadable.append(prefix)
                older = candidates[len(skipped)] if len(skipped) < len(candidates) else None
                after = f"; falling back to {Path(older).name}" if older else ""
                self.log(f"[checkpoint] {reason}{after}")
        raise RunDirError(f"{self.directory}: no readable checkpoint ({'; '.join(skipped)})")

    def set_aside_unreadable(self) -> None:
        """Moves the checkpoints the last restore skipped into `corrupt/` (chief only), so
        that they are neither restored nor counted again; nothing is deleted."""
        if not self.chief:
            return
        aside = self.directory / "corrupt"
        for prefix in self.unreadable:
            aside.mkdir(exist_ok=True)
            for path in Path(prefix).parent.glob(f"{Path(prefix).name}.*"):
                path.replace(aside / path.name)
            self.log(f"[checkpoint] moved {Path(prefix).name} to {aside}")
        self.unreadable = []

    def close(self) -> None:
        """Nothing left to clean up (kept for callers that close checkpoints)."""
