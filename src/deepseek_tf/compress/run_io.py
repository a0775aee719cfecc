"""Reading a source run and writing a compressed one (through `RunDir`), and size figures."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

from deepseek_tf.api import load
from deepseek_tf.errors import RunDirError
from deepseek_tf.rundir import RunDir


def progress(*parts) -> None:
    """Progress lines go to stderr: stdout carries the command's JSON record."""
    print(*parts, file=sys.stderr, flush=True)


def load_source(run_dir):
    """`(config, model, tokenizer)` of a run to compress (latest weights)."""
    config = RunDir(run_dir).read_config()
    model, tokenizer = load(run_dir)
    if tokenizer is None:
        raise RunDirError(f"{run_dir}: has no tokenizer; compression needs its data pipeline")
    return config, model, tokenizer


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


def with_model(config, **changes):
    """`config` with `model` fields replaced (the compressed shape of a run)."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


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
