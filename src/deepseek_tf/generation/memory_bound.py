"""Is a model's step bound by memory on this machine? Its weights against the CPU's cache.

Three decoding choices turn on it. Speculative decoding pays only where a step reads
its weights from memory (a verify pass over several positions then costs about one
step). XLA's CPU backend, whose fused programs win while the weights sit in cache (each
TensorFlow op has a fixed cost that dominates there), gathers expert weights and runs
small batched matmuls slowly once they do not (prefill, `xla_prefill`), and
multiplies 16-bit weights through float32 copies of them (the decode loop,
`xla_decode`; `benchmarks/README.md`, decode_real).
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


def sixteen_bit(dtype) -> bool:
    """Whether `dtype` (a variable's, or a model's `variable_dtype`) is a 16-bit float."""
    return tf.as_dtype(dtype) in (tf.bfloat16, tf.float16)


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


def memory_bound_on_cpu(model, cache_bytes: int | None) -> bool:
    """A CPU-only machine, and `model`'s weights exceed its cache (`fits_in_cache`)."""
    return not accelerated() and fits_in_cache(model, cache_bytes) is False


def xla_prefill(model, jit_compile: bool, cache_bytes: int | None = None) -> bool:
    """Whether `model`'s prefill programs are compiled with XLA: as `jit_compile`, except
    on a CPU-only machine for a model whose weights do not fit in the CPU's cache
    (`memory_bound.fits_in_cache`; `cache_bytes` as there). There TensorFlow's own kernels
    prefilled 512 tokens of the 1.46B demonstration 1.3-2.1x faster than XLA's CPU backend
    (its gathers of expert weights and small batched matmuls are slow) and the first token
    came sooner, while a model held in cache prefills faster with XLA (the shakespeare-char
    server: `benchmarks/README.md`, decode_real and serve_load).
    """
    return jit_compile and not memory_bound_on_cpu(model, cache_bytes)


def xla_decode(model, jit_compile: bool, cache_bytes: int | None = None) -> bool:
    """Whether `model`'s token step and decode loop are compiled with XLA: as
    `jit_compile`, except on a CPU-only machine for a model whose weights are held in a
    16-bit float and do not fit in the CPU's cache. XLA's CPU backend computes bfloat16
    and float16 dots in float32 from converted copies of the weights, and hoists those
    copies out of the decode loop: every weight is held twice more, per call (the 1.46B
    demonstration in bfloat16 peaked at 10.2 GB with XLA against 4.0 GB without, and
    stepped no faster). TensorFlow's own (oneDNN) kernels read the 16-bit weights as
    they are. Float32 weights keep XLA: it fuses the step's many small ops. Such a model
    in the decode layout (`generation.decode_layout`) still runs its batch-1 token step
    under XLA, called from the uncompiled loop (`DecodeLoop.xla_step`).
    """
    return jit_compile and not (
        sixteen_bit(model.variable_dtype) and memory_bound_on_cpu(model, cache_bytes)
    )
