"""The one compression job every method plugs into: load -> measure -> transform -> record
-> write.

A method (quantize, qat, prune, distill, lowrank) checks its options, then hands
`run_job` a `plan_for(config) -> Plan` function: the plan is decided from the source
run's config alone (every config-level refusal happens there, before any weight is read)
and carries the method's `transform(source, log) -> Result`. `run_job` does the rest the
same way for all of them:

1. refuse an `out` that is the source, a file or another run's checkpoints;
2. read the source config and make the plan;
3. load the source run (`rundir.load_run`) and run the plan's `check_loaded` (refusals
   that need the weights' shapes, still before any work);
4. measure the source: parameters, bytes, validation loss;
5. transform (timed), measure the result the same way;
6. write the new run: weights, tokenizer, config, and `compression.json` (the source's
   history plus this record, with `source` and `time`).

The record (returned, printed by the CLI, appended to `compression.json`)::

    {"method": "quantize", "options": {...},           # the options as applied
     "parameters_before": int, "parameters_after": int,  # unique stored weights
     "bytes_before": int, "bytes_after": int,            # bytes of the weights as stored
     "val_loss_before": float, "val_loss_after": float,  # validation split, same batches
     "seconds": float,                                   # the transform's wall time
     ...}                                                # the method's own figures

For `distill`, "before" is the teacher. Progress lines (stderr) come from one logger,
silenced by `quiet`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from deepseek_tf.compress.finetune import validation_loss
from deepseek_tf.compress.run_io import (
    Log,
    Source,
    check_out_dir,
    count_parameters,
    load_source,
    progress_logger,
    weight_bytes,
    write_run,
)
from deepseek_tf.config.schema import Config
from deepseek_tf.errors import CompressionError
from deepseek_tf.rundir import RunDir


@dataclasses.dataclass(frozen=True)
class Result:
    """What a method made of its source.

    Attributes:
        config: the new run's config.
        model: the new run's model.
        details: the method's own record fields (e.g. `ranks`, `removed`).
    """

    config: Config
    model: Any
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A method's work on one run, decided from the run's config before weights are read.

    Attributes:
        method: the record's `method`.
        options: the record's `options` (as applied: defaults resolved).
        transform: `fn(source, log) -> Result`; may change `source.model` in place.
        check_loaded: `fn(source)` raising before any work when the loaded weights
            cannot take the request (None: nothing to check).
    """

    method: str
    options: dict
    transform: Callable[[Source, Log], Result]
    check_loaded: Callable[[Source], None] | None = None


def run_job(run_dir, out, plan_for: Callable[[Config], Plan], *, quiet: bool = False) -> dict:
    """Runs one compression of the run in `run_dir` into the new run `out`.

    Args:
        run_dir: the trained source run.
        out: the new run directory (not the source, not a run with checkpoints).
        plan_for: `fn(source_config) -> Plan`; raises for requests the config refuses.
        quiet: no progress lines.

    Returns:
        The record (see the module docstring).
    """
    out = check_out_dir(run_dir, out)
    plan = plan_for(RunDir(run_dir).read_config())
    source = load_source(run_dir)
    if plan.check_loaded is not None:
        plan.check_loaded(source)
    batches = source.config.train.eval_batches
    before = measure(source.model, source.config, source.tokenizer, batches)
    started = time.perf_counter()
    result = plan.transform(source, progress_logger(quiet))
    seconds = time.perf_counter() - started
    after = measure(result.model, result.config, source.tokenizer, batches)
    record = {"method": plan.method, "options": dict(plan.options)}
    for key in before:
        record[f"{key}_before"], record[f"{key}_after"] = before[key], after[key]
    record.update(result.details)
    record["seconds"] = round(seconds, 3)
    write_run(out, result.config, source.tokenizer, result.model, run_dir, record)
    return record


def measure(model, config, tokenizer, batches: int) -> dict:
    """`{"parameters", "bytes", "val_loss"}` of `model` (`batches` validation batches, 0: all)."""
    return {
        "parameters": count_parameters(model),
        "bytes": weight_bytes(model),
        "val_loss": validation_loss(model, config, tokenizer, batches),
    }


# -- option checks shared by the methods (what argparse checks for the command line) -----------
def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`, else a one-line `CompressionError`."""
    choices = tuple(choices)
    if value not in choices:
        raise CompressionError(f"--{_flag(name)}: choose from {', '.join(choices)}, got {value!r}")
    return value


def check_int(name: str, value, *, minimum: int | None = None, optional: bool = False):
    """`value` if it is an int (not a bool) of at least `minimum` (None allowed when
    `optional`), else a one-line `CompressionError`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CompressionError(f"--{_flag(name)}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise CompressionError(f"--{_flag(name)}: must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value, *, optional: bool = False):
    """`value` as a float if it is a real number (None allowed when `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompressionError(f"--{_flag(name)}: expected a number, got {value!r}")
    return float(value)


def comma_list(name: str, value) -> tuple[str, ...]:
    """`"a,b"` or a sequence of names -> a tuple without blanks or repeats, in order."""
    if isinstance(value, str):
        value = value.split(",")
    elif not isinstance(value, Iterable):
        raise CompressionError(f"--{_flag(name)}: expected a comma list, got {value!r}")
    names = [str(v).strip() for v in value]
    return tuple(dict.fromkeys(n for n in names if n))


def _flag(name: str) -> str:
    return name.replace("_", "-")
