"""How long a served sequence may be: the KV cache sized to a memory budget, not to the
checkpoint's whole context.

A converted DeepSeek-V2/V3 keeps its published context (163,840 positions). The
continuous scheduler holds one cache row per slot, so sizing rows to that context
would need `slots x 163,840 x bytes per position` (about 81 GB for V2-Lite's latent
cache at 16 slots). `plan_cache` instead takes the server's `max_model_len` (`--max-model-len`)
and a memory budget (`--kv-cache-memory`, by default `DEFAULT_FRACTION` of the memory
available when the server starts) and picks the longest sequence whose rows fit both,
as vLLM derives `max_model_len` from `gpu_memory_utilization`. Requests longer than the
plan get a 400 that names it (`serving.protocol.Limits.context`).

The budget covers decoding's working copies too (`WORKING_COPIES`): a decode call
carries the rows' cache through TensorFlow's while loop as tensors, and each step's
write makes a new one while the last is alive, beside the cache variables -- three
caches at once over the span a call reads. TensorFlow's CPU allocator then keeps those
pages, so a server's memory grows to about three times its cache once a call has read
the whole of it (measured: 2.75x, the RSS of `serve` on a 2-layer V2-Lite-shaped int4
run with budgets of 1 GiB and 5.08 GiB). Writing the cache in
place inside the loop would remove the copies; until then the plan is sized so that
the three fit the budget.

Examples:
    >>> plan = plan_cache(model, max_batch=16)  # doctest: +SKIP
    >>> plan.describe()  # doctest: +SKIP
    'KV cache: 16 slots x 8,192 positions (1.8 GiB; 5.4 GiB with decoding's working ...'

"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil
import tensorflow as tf

from deepseek_tf.errors import InputError

DEFAULT_FRACTION = 0.25  # of the memory available at start-up, when no budget is given
WORKING_COPIES = 3  # caches alive while a decode call writes one (see the module docstring)
MIN_MODEL_LEN = 64  # shorter rows than this serve nothing useful: refuse the budget
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
          "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40,
          "tib": 2**40}  # fmt: skip


def parse_size(text: str | int | float, key: str = "--kv-cache-memory") -> int:
    """`"4GiB"`, `"512M"`, `"1.5g"` or a number of bytes -> bytes (binary units)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise InputError(f"{key}: a size such as 4GiB, 512MiB or a number of bytes, "
                             f"got {text!r}")  # fmt: skip
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise InputError(f"{key} must be more than 0 bytes, got {text!r}")
    return size


def cache_bytes(model, batch_size: int = 1) -> tuple[int, int]:
    """`(bytes per position, fixed bytes)` of `model.init_cache(batch_size, S)`: what grows
    with the sequence (K/V or MLA latents) and what does not (convolution states).
    Measured on two short caches, so nothing of the model's whole context is allocated."""

    def size(length: int) -> int:
        leaves = tf.nest.flatten(model.init_cache(batch_size, length))
        return sum(int(t.shape.num_elements()) * t.dtype.size for t in leaves)

    short, long = size(16), size(32)
    per_position = (long - short) // 16
    return per_position, short - 16 * per_position


def available_memory() -> int:
    """Bytes the operating system can give this process now (MemAvailable)."""
    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class CachePlan:
    """The serving cache chosen at start-up."""

    slots: int
    max_model_len: int  # positions per row: the longest prompt + reply served
    bytes: int  # the cache's size (all rows)
    budget: int  # the budget it was fitted to
    budget_source: str  # how the budget was chosen, for the start-up line
    context: int  # the checkpoint's own context (model.max_seq_len)

    @property
    def peak_bytes(self) -> int:
        """The cache with decoding's working copies: what the budget must hold."""
        return WORKING_COPIES * self.bytes

    def describe(self) -> str:
        capped = "" if self.max_model_len == self.context else (
            f"; the checkpoint's context is {self.context:,}")  # fmt: skip
        return (
            f"KV cache: {self.slots} slots x {self.max_model_len:,} positions "
            f"({_gib(self.bytes)}; {_gib(self.peak_bytes)} with decoding's working "
            f"copies, of a {_gib(self.budget)} budget: {self.budget_source}){capped}"
        )


def _gib(n: int) -> str:
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def plan_cache(model, max_batch: int, max_model_len: int | None = None,
               kv_cache_memory: str | int | None = None) -> CachePlan:  # fmt: skip
    """The longest rows `max_batch` slots can have within the budget.

    Args:
        model: a `CausalLM`.
        max_batch: slots (rows decoded together).
        max_model_len: positions per row (None: the checkpoint's context, lowered to what
            the budget holds).
        kv_cache_memory: the budget (`parse_size` forms; None: `DEFAULT_FRACTION` of the
            memory available now).

    Raises:
        InputError: `max_model_len` above the checkpoint's context or below 1, a budget
            that cannot hold `max_model_len` (or `MIN_MODEL_LEN`) positions per slot.
    """
    context = int(model.max_seq_len)
    if max_model_len is not None and not 1 <= int(max_model_len) <= context:
        raise InputError(f"--max-model-len must be between 1 and the checkpoint's context "
                         f"of {context:,}, got {max_model_len}")  # fmt: skip
    if kv_cache_memory is None:
        available = available_memory()
        budget = int(available * DEFAULT_FRACTION)
        source = f"{DEFAULT_FRACTION:.0%} of the {_gib(available)} available"
    else:
        budget, source = parse_size(kv_cache_memory), "as given"
    per_position, fixed = cache_bytes(model, max_batch)
    fits = (budget // WORKING_COPIES - fixed) // max(per_position, 1)
    wanted = context if max_model_len is None else int(max_model_len)
    floor = wanted if max_model_len is not None else min(MIN_MODEL_LEN, wanted)  # at least
    if fits < floor:
        need = WORKING_COPIES * (fixed + per_position * floor)
        raise InputError(
            f"--kv-cache-memory: {_gib(budget)} ({source}) holds {max(fits, 0):,} positions "
            f"per slot for {max_batch} slots; {_gib(need)} "
            f"needed for {floor:,} with decoding's working copies (raise --kv-cache-memory, "
            f"lower --max-model-len or --max-batch)"
        )
    length = min(wanted, fits)
    return CachePlan(max_batch, int(length), fixed + per_position * int(length), budget,
                     source, context)  # fmt: skip
