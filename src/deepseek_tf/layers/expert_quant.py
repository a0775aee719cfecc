"""Weight-only int8 / int4 quantization of stacked expert weights `(E, in, out)`.

Routed experts are most of a DeepSeek model's parameters (97% of V3's), and they
are stacked tensors, not `Dense` layers, so none of Keras' quantizers reach them.
This module applies Keras' own primitives to the stack: `abs_max_quantize` (a
symmetric abs-max scale per output channel of each expert, or per group of
`group_size` inputs) and `pack_int4` / `unpack_int4` (two 4-bit values per byte
along the input axis). The codes stay packed in memory and on disk; a matmul
dequantizes only the experts it uses (`dequantize`, after a gather).

Layout, for a stack of `E` experts with `I` inputs and `O` outputs and `G` groups
(`G = 1` per channel, else `I / group_size`):
    codes: int8 `(E, I, O)` (int8) or `(E, ceil(I / 2), O)` (int4, packed)
    scale: float32 `(E, G, O)`; a weight is `code / scale` (Keras' convention)
"""

from __future__ import annotations

import numpy as np
from keras import ops, quantizers

MODES = ("none", "int8", "int4")
RANGES = {"int8": (-127, 127), "int4": (-8, 7)}


def n_groups(in_dim: int, group_size: int) -> int:
    """Scale groups along the input axis (`group_size` -1: one per channel)."""
    return 1 if group_size == -1 else in_dim // group_size


def check_group_size(in_dim: int, group_size: int, name: str = "group_size") -> None:
    if group_size == -1:
        return
    if group_size <= 0 or in_dim % group_size:
        raise ValueError(
            f"{name}: {group_size} must be -1 (per channel) or divide the expert input "
            f"width {in_dim}"
        )


def stored_shapes(shape: tuple[int, int, int], mode: str, group_size: int) -> dict:
    """`{"codes": shape, "scale": shape}` of a quantized `(E, I, O)` stack."""
    e, i, o = shape
    rows = (i + 1) // 2 if mode == "int4" else i
    return {"codes": (e, rows, o), "scale": (e, n_groups(i, group_size), o)}


def quantize(weights, mode: str, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`(codes, scale)` of a float `(E, I, O)` stack (see the module docstring)."""
    w = np.asarray(weights, np.float32)
    e, i, o = w.shape
    check_group_size(i, group_size)
    g = n_groups(i, group_size)
    grouped = w.reshape(e, g, i // g, o)  # (E, G, I / G, O)
    codes, scale = quantizers.abs_max_quantize(
        grouped, axis=2, value_range=RANGES[mode], dtype="int8", to_numpy=True
    )  # (E, G, I / G, O), (E, G, 1, O)
    codes = np.asarray(codes).reshape(e, i, o)  # (E, I, O)
    if mode == "int4":
        packed, _, _ = quantizers.pack_int4(codes, axis=1)  # (E, ceil(I / 2), O)
        codes = np.asarray(packed)
    return codes, np.asarray(scale, np.float32).reshape(e, g, o)


def dequantize(codes, scale, mode: str, in_dim: int, dtype):
    """The float `(..., I, O)` weights of `codes` / `scale` (any leading axes, e.g. a
    gather of the experts a tile uses), in `dtype`."""
    if mode == "int4":
        codes = quantizers.unpack_int4(codes, in_dim, axis=-2)  # (..., I, O)
    lead = ops.shape(codes)[:-2]
    g, o = ops.shape(scale)[-2], ops.shape(scale)[-1]
    grouped = ops.reshape(ops.cast(codes, "float32"), (*lead, g, in_dim // g, o))
    w = grouped / ops.expand_dims(scale, -2)  # (..., G, I / G, O)
    return ops.cast(ops.reshape(w, (*lead, in_dim, o)), dtype)  # (..., I, O)


def stored_bytes(shape: tuple[int, int, int], mode: str, group_size: int) -> int:
    """Bytes a stack occupies: float32 when `mode` is none, else codes + scales."""
    if mode == "none":
        return 4 * int(np.prod(shape))
    s = stored_shapes(shape, mode, group_size)
    return int(np.prod(s["codes"])) + 4 * int(np.prod(s["scale"]))
