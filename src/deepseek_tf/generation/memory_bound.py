"""Is a model's step bound by memory on this machine? Its weights against the CPU's cache.

Three decoding choices turn on it. Speculative decoding pays only where a step reads
its weights from memory (a verify pass over several positions then costs about one
step). XLA's CPU backend, whose fused programs win while the weights sit in cache (each
TensorFlow op has a fixed cost that dominates there), gathers expert weights and runs
small batched matmuls slowly once they do not (prefill, `decoding.xla_prefill`), and
multiplies 16-bit weights through float32 copies of them (the decode loop,
`decoding.xla_decode`; `benchmarks/README.md`, decode_real).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


def last_level_cache_bytes() -> int | None:
    """The CPU's largest cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def weight_bytes(model) -> int:
    """Bytes of every weight of `model`, as stored."""
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in model.weights)


def accelerated() -> bool:
    """True where a GPU or TPU is present."""
    return any(tf.config.list_physical_devices(kind) for kind in ("GPU", "TPU"))


def fits_in_cache(model, cache_bytes: int | None = None) -> bool | None:
    """Whether `model`'s weights fit in the CPU's last-level cache (`cache_bytes`; read
    from the system when None), or None where the cache size is unknown."""
    cache_bytes = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    return None if not cache_bytes else weight_bytes(model) <= cache_bytes
