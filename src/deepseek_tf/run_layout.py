"""The run directory's layout: its file names, atomic writes, metrics log and history.

A run directory holds everything needed to use a model::

    config.yaml          the resolved config (rebuilds the model)
    char_tokenizer.json  or tokenizer.json (Hugging Face format)
    checkpoints/         weights, optimizer state and step (`training.checkpoint`)
    best/                the best validation's weights (`train.keep_best`, `training.best`)
    metrics.jsonl        one JSON object per logged step, evaluation, checkpoint, best
    logs/                TensorBoard event files
    compression.json     what `deepseek-tf compress` did to it (compressed runs)
    hf_config.json       the source `config.json` (runs converted from Hugging Face)

Every file is written atomically (a temporary file in the same directory, then
`os.replace`), so a run killed at any moment holds either the old or the new version;
`metrics.jsonl` is appended line by line and read back tolerating a torn last line.

`RunLayout` reads and writes these files without building a model, so the trainer (which
writes a run) can use it; `deepseek_tf.rundir.RunDir` adds loading the model and is the
class everyone else opens runs with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from deepseek_tf.config.loader import config_from_yaml, config_to_yaml, read_text_file
from deepseek_tf.config.schema import Config
from deepseek_tf.errors import RunDirError
from deepseek_tf.tokenizers import load_tokenizer
from deepseek_tf.training.checkpoint import RunCheckpoint, checkpoints_on_disk

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
HISTORY_FILE = "compression.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
LOG_DIR = "logs"
HF_SOURCE_CONFIG = "hf_config.json"
GLOB_CHARS = ("[", "]", "*", "?")  # TensorFlow's checkpoint reader matches paths as patterns


def atomic_write_text(path, text: str) -> None:
    """Writes `text` to `path` so that readers see the old or the new file, never half.

    Args:
        path: the file (its directory must exist).
        text: the whole new content (UTF-8).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLog:
    """`metrics.jsonl`: appended a line at a time; on resume, entries after the restored
    checkpoint are dropped (atomically); a torn or garbled line is skipped when read.

    Args:
        path: the `metrics.jsonl` file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """The logged entries, oldest first."""
        if not self.path.is_file():
            return []
        entries = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill, or hand-edited garbage
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def truncate_after(self, step: int) -> None:
        """Drops the entries logged after `step`."""
        if not self.path.is_file():
            return
        keep = [e for e in self.read() if e.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in keep))

    def write(self, **entry) -> None:
        """Appends one entry."""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class NoMetrics:
    """What a non-chief worker logs: nothing (the chief writes the run's files)."""

    def read(self) -> list[dict]:
        return []

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, **entry) -> None:
        pass


class RunLayout:
    """The files of a run directory (see the module docstring); builds no model.

    Args:
        path: the directory.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_DIR
        self.best_dir = self.path / BEST_DIR
        self.logs_dir = self.path / LOG_DIR
        self.metrics = MetricsLog(self.path / METRICS_FILE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # -- what is there --------------------------------------------------------------------
    def exists(self) -> bool:
        """True when the directory holds a run (its `config.yaml`)."""
        return self.config_path.is_file()

    def has_checkpoints(self) -> bool:
        """True when `checkpoints/` holds at least one `ckpt-N`."""
        return bool(checkpoints_on_disk(self.checkpoint_dir))

    def has_best(self) -> bool:
        """True when `best/` holds the weights of a best validation (`train.keep_best`)."""
        return bool(checkpoints_on_disk(self.best_dir))

    def require(self):
        """Raises `RunDirError` unless the directory holds a run; returns `self`."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")
        if not self.exists():
            raise RunDirError(
                f"{self.path}: no {CONFIG_FILE} (is this a deepseek-tf run directory?)"
            )
        return self

    def check_new(self, option: str = "--out"):
        """Refuses a path a new run must not be written to: an existing file, the
        directory of a run that has checkpoints, a path with glob characters (TensorFlow
        reads checkpoint paths as patterns: such a run would train and never load).
        Returns `self`."""
        if any(c in str(self.path.absolute()) for c in GLOB_CHARS):
            raise RunDirError(
                f"{option} {self.path}: a run directory's path cannot contain any of "
                f"{' '.join(GLOB_CHARS)} (TensorFlow reads checkpoint paths as glob patterns)"
            )
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{option} {self.path} is an existing file; choose a directory")
        if (
            self.has_checkpoints()
            or self.has_best()
            or (self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir()))
        ):
            raise RunDirError(
                f"{self.path} already holds checkpoints: pass --resume to continue it, "
                f"or choose another {option}"
            )
        return self

    # -- config, tokenizer, history ---------------------------------------------------------
    def read_config(self) -> Config:
        """The run's `config.yaml` (`RunDirError` when there is none)."""
        self.require()
        text = read_text_file(self.config_path, "run config")
        return config_from_yaml(text, str(self.config_path))

    def write_config(self, config: Config) -> None:
        """Writes `config.yaml` (atomically; creates the directory)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config_to_yaml(config))

    def read_tokenizer(self, required: bool = True):
        """The run's tokenizer; None when it has none and `required` is False."""
        try:
            return load_tokenizer(self.path)
        except RunDirError:
            if required:
                raise
            return None

    def write_tokenizer(self, tokenizer) -> None:
        """Saves `tokenizer` into the run (atomic: see `Tokenizer.save`)."""
        tokenizer.save(self.path)

    def copy_in(self, source, name: str) -> None:
        """Copies the file `source` into the run as `name` (atomically)."""
        target = self.path / name
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_history(self) -> list[dict]:
        """The compression methods applied to the run, oldest first."""
        path = self.path / HISTORY_FILE
        if not path.is_file():
            return []
        try:
            history = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RunDirError(f"{path}: unreadable ({e})") from None
        return history if isinstance(history, list) else []

    def write_history(self, history: list[dict]) -> None:
        """Writes `compression.json` (atomically)."""
        atomic_write_text(self.path / HISTORY_FILE, json.dumps(history, indent=2) + "\n")

    # -- weights ------------------------------------------------------------------------------
    def checkpoint(
        self, model, optimizer=None, keep: int = 3, *, chief: bool = True, extra=None
    ) -> RunCheckpoint:
        """The run's checkpoints of `model` (and `optimizer`); see `RunCheckpoint`."""
        return RunCheckpoint(self.checkpoint_dir, model, optimizer, keep, chief=chief, extra=extra)

    def best_checkpoint(self, model, *, chief: bool = True, extra=None) -> RunCheckpoint:
        """The best validation's weights of `model` (`train.keep_best`): one model-only
        checkpoint in `best/`, replaced by each better one (`training.best`)."""
        return RunCheckpoint(self.best_dir, model, keep=1, chief=chief, extra=extra)

    def weights_checkpoint(self, model, config: Config) -> RunCheckpoint:
        """Where the run's model is loaded from (`eval`, `generate`, `export`, `serve`,
        `compress`): with `train.keep_best`, the best validation's weights once one was
        saved; otherwise the newest checkpoint (the last weights, which `--resume` reads)."""
        if config.train.keep_best and self.has_best():
            return self.best_checkpoint(model)
        return self.checkpoint(model)

    def write_weights_run(self, config: Config, tokenizer, model, history=None) -> None:
        """Writes a run made from weights in memory (compressed, converted): weights at
        step 0, the tokenizer, the history, and `config.yaml` last -- a directory is a run
        once it has its config."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoint(model).save(0)
        if tokenizer is not None:
            self.write_tokenizer(tokenizer)
        if history is not None:
            self.write_history(history)
        self.write_config(config)
