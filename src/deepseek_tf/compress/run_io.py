"""Reading a source run and writing a compressed one (through `RunDir`), and size figures.

Every compression method (and `calibrate`) opens its source with `load_source`, refuses a
bad `out` with `check_out_dir`, changes the config through `config.loader.update_config`
and writes the new run with `write_run`; progress lines go through `progress_logger`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepseek_tf.config.schema import Config
from deepseek_tf.errors import RunDirError
from deepseek_tf.rundir import RunDir, load_run

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Source:
    """A trained run opened for compression (latest weights).

    Attributes:
        run_dir: its directory.
        config: its config.
        model: its `CausalLM`.
        tokenizer: its tokenizer (compression needs the run's data pipeline).
    """

    run_dir: Path
    config: Config
    model: Any
    tokenizer: Any


def progress(*parts) -> None:
    """Progress lines go to stderr: stdout carries the command's JSON record."""
    print(*parts, file=sys.stderr, flush=True)


def progress_logger(quiet: bool) -> Log:
    """The one progress printer of a compression job: `progress`, or silence."""
    return _silent if quiet else progress


def _silent(*_parts) -> None:
    return None


def load_source(run_dir) -> Source:
    """The run to compress, with its latest weights (`rundir.load_run`).

    Raises:
        RunDirError: no run there, or a run without a tokenizer.
    """
    config = RunDir(run_dir).read_config()
    model, tokenizer = load_run(run_dir)
    if tokenizer is None:
        raise RunDirError(f"{run_dir}: has no tokenizer; compression needs its data pipeline")
    return Source(Path(run_dir), config, model, tokenizer)


def check_out_dir(source, out_dir) -> Path:
    """Refuses to overwrite the source run, an existing file or another run's checkpoints."""
    out = Path(out_dir)
    if out.resolve() == Path(source).resolve():
        raise RunDirError(f"--out {out} is the source run; choose a new directory")
    RunDir(out).check_new()
    return out


def write_run(out_dir, config, tokenizer, model, source, record: dict) -> Path:
    """Writes the compressed run: weights, tokenizer, `compression.json` (the source's
    history plus `record`: method, options, measured figures) and `config.yaml`."""
    entry = {"source": str(source), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    history = RunDir(source).read_history() + [entry]
    RunDir(out_dir).write_weights_run(config, tokenizer, model, history)
    return Path(out_dir)


def count_parameters(model) -> int:
    """Stored elements of `model`'s weights, each shared variable once."""
    return int(sum(math.prod(v.shape) for v in {id(v): v for v in model.weights}.values()))


def weight_bytes(model) -> int:
    """Bytes of the model's variables as stored (int8/packed int4 count as such)."""
    return int(sum(v.numpy().nbytes for v in model.weights))


def directory_bytes(path) -> int:
    """Bytes of the files under the run's checkpoint directory (the weights on disk)."""
    root = RunDir(path).checkpoint_dir
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
