"""`train.stages`: progressive training, the brief's "small first, then full".

A stage is one string, `"steps=N[,seq_len=T][,batch_size=B]"`: `N` steps on sequences of
`T` tokens in batches of `B` (by default `data.seq_len` and `train.batch_size`), the
stages in order, their steps adding up to `train.steps`. The run stays one: one model,
one optimizer state, one learning-rate schedule over all the steps, one metrics history,
validation on `data.seq_len`; a run resumed at any step continues inside the stage that
step belongs to. Only the shape of the training batches changes between stages, so any
other key is refused (the architecture cannot change mid-run).

Examples:

>>> from deepseek_tf.config.schema import DataConfig, TrainConfig
>>> train = TrainConfig(steps=1000, stages=("steps=300,seq_len=64", "steps=700"))
>>> [s.seq_len for s in parse_stages(train, DataConfig(seq_len=256), max_seq_len=256)]
[64, 256]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from deepseek_tf.errors import ConfigError

KEYS = ("steps", "seq_len", "batch_size")


@dataclass(frozen=True)
class Stage:
    """Steps `first + 1 ... last` of a run, on `(batch_size, seq_len)` batches."""

    first: int
    last: int
    seq_len: int
    batch_size: int


def _values(i: int, text: str) -> dict[str, int]:
    """`{"steps": N, ...}` of stage `i`'s string; a bad part is a `ConfigError`."""
    values = {}
    for part in str(text).split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if key not in KEYS:
            raise ConfigError(
                f"train.stages[{i}]: {key!r} cannot change between stages (only "
                f"{', '.join(KEYS)} can: the model and the rest of the run stay one)"
            )
        if not sep or not value.isdigit() or int(value) == 0:
            raise ConfigError(f"train.stages[{i}]: {key} must be a positive integer, got {value!r}")
        values[key] = int(value)
    if "steps" not in values:
        raise ConfigError(f"train.stages[{i}]: give its steps, e.g. 'steps=500,seq_len=64'")
    return values


def parse_stages(train, data, max_seq_len: int) -> tuple[Stage, ...]:
    """The stages of `train.stages` (empty: none), validated against `train.steps`,
    `data.seq_len` (and its length jitter), `train.batch_size` and `max_seq_len`."""
    out, done = [], 0
    for i, text in enumerate(train.stages):
        values = _values(i, text)
        length = values.get("seq_len", data.seq_len)
        packed = replace(data, seq_len=length).packed_length()
        if packed > max_seq_len:
            raise ConfigError(
                f"train.stages[{i}]: sequences of {packed} tokens exceed "
                f"model.max_seq_len={max_seq_len}"
            )
        last = done + values["steps"]
        out.append(Stage(done, last, length, values.get("batch_size", train.batch_size)))
        done = last
    if out and done != train.steps:
        raise ConfigError(
            f"train.stages: their steps add up to {done}, not train.steps={train.steps}"
        )
    return tuple(out)


def stage_at(stages: Sequence[Stage], step: int) -> Stage | None:
    """The stage that trains step `step + 1` (the one after `step` steps), or None."""
    return next((s for s in stages if s.first <= step < s.last), None)
