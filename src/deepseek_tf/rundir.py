"""The run directory: the one owner of its file names, its atomic writes and its loading.

A run directory holds everything needed to use a model::

    config.yaml          the resolved config (rebuilds the model)
    char_tokenizer.json  or tokenizer.json (Hugging Face format)
    checkpoints/         weights, optimizer state and step (`training.checkpoint`)
    metrics.jsonl        one JSON object per logged step, evaluation, checkpoint
    logs/                TensorBoard event files
    compression.json     what `deepseek-tf compress` did to it (compressed runs)
    hf_config.json       the source `config.json` (runs converted from Hugging Face)

Every file is written atomically (a temporary file in the same directory, then
`os.replace`), so a run killed at any moment holds either the old or the new version;
`metrics.jsonl` is appended line by line and read back tolerating a torn last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import keras
import tensorflow as tf

# The checkpoint's object graph (its file format, which TensorFlow exports no reader for).
from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

from deepseek_tf.config.loader import config_from_yaml, config_to_yaml, read_text_file
from deepseek_tf.config.schema import Config
from deepseek_tf.errors import RunDirError
from deepseek_tf.models.builder import build_model
from deepseek_tf.models.footprint import check_fits
from deepseek_tf.tokenizers import load_tokenizer
from deepseek_tf.training.checkpoint import RunCheckpoint, checkpoints_on_disk

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
HISTORY_FILE = "compression.json"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
HF_SOURCE_CONFIG = "hf_config.json"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # where tf.train.Checkpoint keeps its graph


def atomic_write_text(path, text: str) -> None:
    """Writes `text` to `path` so that readers see the old or the new file, never half."""
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
    checkpoint are dropped (atomically); a torn or garbled line is skipped when read."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
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
        if not self.path.is_file():
            return
        keep = [e for e in self.read() if e.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in keep))

    def write(self, **entry) -> None:
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


class RunDir:
    """A run directory (see the module docstring).

    Args:
        path: the directory.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_DIR
        self.logs_dir = self.path / LOG_DIR
        self.metrics = MetricsLog(self.path / METRICS_FILE)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- what is there --------------------------------------------------------------------
    def exists(self) -> bool:
        """True when the directory holds a run (its `config.yaml`)."""
        return self.config_path.is_file()

    def has_checkpoints(self) -> bool:
        return bool(checkpoints_on_disk(self.checkpoint_dir))

    def require(self) -> RunDir:
        """Raises `RunDirError` unless the directory holds a run."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")
        if not self.exists():
            raise RunDirError(
                f"{self.path}: no {CONFIG_FILE} (is this a deepseek-tf run directory?)"
            )
        return self

    def check_new(self, option: str = "--out") -> RunDir:
        """Refuses a path a new run must not be written to: an existing file, the
        directory of a run that has checkpoints."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{option} {self.path} is an existing file; choose a directory")
        if self.has_checkpoints() or (
            self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir())
        ):
            raise RunDirError(
                f"{self.path} already holds checkpoints: pass --resume to continue it, "
                f"or choose another {option}"
            )
        return self

    # -- config, tokenizer, history ---------------------------------------------------------
    def read_config(self) -> Config:
        self.require()
        text = read_text_file(self.config_path, "run config")
        return config_from_yaml(text, str(self.config_path))

    def write_config(self, config: Config) -> None:
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
        tokenizer.save(self.path)  # atomic (see `Tokenizer.save`)

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
        atomic_write_text(self.path / HISTORY_FILE, json.dumps(history, indent=2) + "\n")

    # -- weights ------------------------------------------------------------------------------
    def checkpoint(self, model, optimizer=None, keep: int = 3, *, chief: bool = True, extra=None):
        return RunCheckpoint(self.checkpoint_dir, model, optimizer, keep, chief=chief, extra=extra)

    def load(self, config: Config | None = None):
        """`(model, tokenizer)` with the latest readable weights.

        The tokenizer is None for a run that has none (e.g. a converted checkpoint whose
        source shipped no `tokenizer.json`); the model then takes token ids.
        """
        config = config or self.read_config()
        tokenizer = self.read_tokenizer(required=False)
        # the checkpoint overwrites every weight (quantizing the structure reads them)
        with initializers_skipped(zero_fill=config.model.quantize != "none") as skipped:
            model = build_model(config)  # the config's vocab_size (may exceed the tokenizer's)
        checkpoint = self.checkpoint(model)
        restore_weights(checkpoint)
        skipped.run_except(model, _variables(checkpoint.checkpoint))
        return model, tokenizer

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


def load_run(run_dir):
    """Loads a run directory: `(model, tokenizer)` with its latest readable weights, after
    checking that the model fits this machine's memory (a one-line error otherwise).

    The library's one way to open a run (`deepseek_tf.load` re-exports it). The tokenizer
    is None for a run that has none; the model then takes token ids.
    """
    run = RunDir(run_dir)
    config = run.read_config()
    check_fits(config, purpose="inference")
    return run.load(config)


# -- loading weights without a second copy of the model ---------------------------------------
# TensorFlow's CPU allocator (oneDNN's, the default) keeps every page it ever used, so peak RSS
# is the most tensor memory ever held at once. Weights are loaded into variables that never
# held random values (initialisers' float32 temporaries would stay resident), one variable at
# a time (`Checkpoint.restore` reads every tensor before assigning any: the model twice).

_SKIPPING = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH: dict = {"users": 0}
_INIT = "_initialize_with_initializer"


class SkippedInitializers:
    """The Keras variables created under `initializers_skipped`, with the initialisers
    they did not run."""

    def __init__(self, zero_fill: bool = False):
        self.pending: list = []
        self.zero_fill = zero_fill

    def run_except(self, model, loaded) -> int:
        """Runs the skipped initialiser of each of `model`'s variables not in `loaded` (the
        ones something overwrote); returns how many ran."""
        done, live = {id(v) for v in loaded}, {id(v) for v in model.variables}
        rest = [(v, f) for v, f in self.pending if id(v) in live and id(v) not in done]
        for variable, initializer in rest:
            variable.assign(initializer(tuple(variable.shape), dtype=variable.dtype))
        self.pending = []
        return len(rest)


def _uninitialized(self, initializer):
    skipped = getattr(_SKIPPING, "current", None)
    if skipped is not None and isinstance(initializer, keras.initializers.Initializer):
        skipped.pending.append((self, initializer))
        zeros = skipped.zero_fill

        def initializer(shape, dtype):  # unless zero-filled, no page of it is touched
            return tf.raw_ops.Empty(shape=shape, dtype=tf.as_dtype(dtype), init=zeros)

    _PATCH["original"](self, initializer)


@contextlib.contextmanager
def initializers_skipped(zero_fill: bool = False):
    """Keras variables created inside (in this thread) do not run their initialisers
    (`keras.initializers.Initializer`s; seed-generator states and the like are
    initialised as usual): their memory is left unwritten, for weights about to be
    overwritten, or zero-filled with `zero_fill` (for a build that computes from them,
    as quantization does). Yields a `SkippedInitializers` that runs the skipped ones
    later where nothing was loaded.

    Keras has no public hook for this: the backend `Variable._initialize_with_initializer`
    (Keras 3) is wrapped while a block is open; without it variables are initialised
    as usual.
    """
    with _PATCH_LOCK:
        if _PATCH["users"] == 0 and hasattr(keras.Variable, _INIT):
            _PATCH.update(
                saved=vars(keras.Variable).get(_INIT), original=getattr(keras.Variable, _INIT)
            )
            setattr(keras.Variable, _INIT, _uninitialized)
        _PATCH["users"] += 1
    skipped, outer = SkippedInitializers(zero_fill), getattr(_SKIPPING, "current", None)
    _SKIPPING.current = skipped
    try:
        yield skipped
    finally:
        _SKIPPING.current = outer
        with _PATCH_LOCK:
            _PATCH["users"] -= 1
            if _PATCH["users"] == 0 and _PATCH.pop("original", None) is not None:
                saved = _PATCH.pop("saved")
                setattr(keras.Variable, _INIT, saved) if saved else delattr(keras.Variable, _INIT)


class _Mismatch(Exception):
    """The checkpoint reads but does not fit the model."""


def _is_variable(obj) -> bool:
    return isinstance(obj, (tf.Variable, keras.Variable))


def _variables(root) -> list:
    """The variables of `root`'s object graph (what a `tf.train.Checkpoint` saves)."""
    return [o for o in tf.train.TrackableView(root).descendants() if _is_variable(o)]


def _name(variable) -> str:
    return getattr(variable, "path", None) or variable.name


def _restore_plan(root, prefix: str) -> list | None:
    """`[(variable, checkpoint key, dtype)]` for every variable of `root` (a
    `tf.train.Checkpoint`), matched through the checkpoint's object graph as
    `Checkpoint.restore` matches them; None when the graph holds state other than
    variables (then TensorFlow restores it).

    Raises:
        _Mismatch: a variable is missing from the checkpoint or differs in shape or dtype.
    """
    reader = tf.train.load_checkpoint(prefix)
    graph = TrackableObjectGraph.FromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    plan, bound = [], set()
    for node_id, obj in tf.train.CheckpointView(prefix).match(root).items():
        attributes = graph.nodes[node_id].attributes
        if not attributes:
            continue
        if not _is_variable(obj) or [a.name for a in attributes] != ["VARIABLE_VALUE"]:
            return None
        key = attributes[0].checkpoint_key
        have = (dtypes[key].name, tuple(shapes[key]))
        want = (tf.as_dtype(obj.dtype).name, tuple(obj.shape))
        if have != want:
            raise _Mismatch(f"{_name(obj)}: {have[0]}{list(have[1])} in the checkpoint, "
                            f"{want[0]}{list(want[1])} in the model")  # fmt: skip
        plan.append((obj, key, dtypes[key]))
        bound.add(id(obj))
    missing = [_name(v) for v in _variables(root) if id(v) not in bound]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _Mismatch(f"{missing[0]}: not in the checkpoint{more}")
    return plan


def restore_weights(checkpoint: RunCheckpoint) -> int:
    """`checkpoint.restore(weights_only=True)` one variable at a time: the newest
    checkpoint that reads back (a corrupt one is named and skipped, as there), each
    variable read with its own RestoreV2 and assigned before the next is read. Returns
    the checkpoint's step.

    Raises:
        RunDirError: no checkpoint, none readable, or one that does not fit the model.
    """

    def restore_one(prefix):
        plan = _restore_plan(checkpoint.checkpoint, prefix)
        if plan is None:  # state other than variables: TensorFlow's restore
            return checkpoint.restore(prefix, weights_only=True)
        for variable, key, dtype in plan:
            args = {"tensor_names": [key], "shape_and_slices": [""], "dtypes": [dtype]}
            variable.assign(tf.raw_ops.RestoreV2(prefix=prefix, **args)[0])
        return int(checkpoint.step.numpy())

    return checkpoint.restore_first_readable(checkpoint.candidates(), restore_one)
