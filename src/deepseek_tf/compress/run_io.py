"""Reading a source run and writing a compressed one, with its compression history."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from deepseek_tf.config.loader import load_run_config, save_config
from deepseek_tf.errors import RunDirError

HISTORY_FILE = "compression.json"


def progress(*parts) -> None:
    """Progress lines go to stderr: stdout carries the command's JSON record."""
    print(*parts, file=sys.stderr, flush=True)


def read_history(run_dir) -> list[dict]:
    """The methods applied to a run, oldest first (empty for a plainly trained run)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def load_source(run_dir):
    """`(config, model, tokenizer)` of a run to compress (latest weights)."""
    from deepseek_tf.api import load

    config = load_run_config(run_dir)
    model, tokenizer = load(run_dir)
    if tokenizer is None:
        raise RunDirError(f"{run_dir}: has no tokenizer; compression needs its data pipeline")
    return config, model, tokenizer


def check_out_dir(source, out_dir) -> Path:
    """Refuses to overwrite the source run or another run's checkpoints."""
    out = Path(out_dir)
    if out.resolve() == Path(source).resolve():
        raise RunDirError(f"--out {out} is the source run; choose a new directory")
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise RunDirError(f"{out} already holds checkpoints; choose another --out")
    return out


def write_run(out_dir, config, tokenizer, model, source, record: dict) -> Path:
    """Writes `config.yaml`, the tokenizer, the weights and `compression.json`.

    `record` (method, options, measured figures) is appended to the source's history.
    """
    from deepseek_tf.training.checkpoint import RunCheckpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    tokenizer.save(out)
    RunCheckpoint(out, model).save(0)
    entry = {"source": str(source), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    history = read_history(source) + [entry]
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    return out


def with_model(config, **changes):
    """`config` with `model` fields replaced (the compressed shape of a run)."""
    import dataclasses

    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


def count_parameters(model) -> int:
    """Stored elements of `model`'s weights, each shared variable once."""
    return int(sum(math.prod(v.shape) for v in {id(v): v for v in model.weights}.values()))


def weight_bytes(model) -> int:
    """Bytes of the model's variables as stored (int8/packed int4 count as such)."""
    return int(sum(v.numpy().nbytes for v in model.weights))


def directory_bytes(path) -> int:
    """Bytes of the files under `path/checkpoints` (the weights on disk)."""
    root = Path(path) / "checkpoints"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
