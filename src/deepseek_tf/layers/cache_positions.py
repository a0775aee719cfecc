"""Positions of a cached attention call: where its queries sit and where it writes.

A cached call runs `T` new tokens per row. `cache_index` is either an int32 scalar (every
row's tokens start at the same position: `generate`, prefill) or a `(B,)` vector of per-row
start positions (a continuous batch, whose rows joined at different times and sit at
different positions of their own cache slots). These helpers give both forms one code
path in every attention layer.
"""

from __future__ import annotations

from keras import ops


def is_per_row(cache_index) -> bool:
    """True when `cache_index` is a `(B,)` vector of per-row positions."""
    shape = getattr(cache_index, "shape", None)
    return shape is not None and len(shape) == 1


def query_positions(cache_index, t):
    """Absolute positions of the `t` new tokens: `(T,)`, or `(B, T)` per row.

    >>> query_positions(3, 2).numpy().tolist()
    [3, 4]
    >>> query_positions(ops.convert_to_tensor([0, 5]), 2).numpy().tolist()
    [[0, 1], [5, 6]]
    """
    offsets = ops.arange(t, dtype="int32")  # (T,)
    start = 0 if cache_index is None else ops.cast(cache_index, "int32")
    if is_per_row(cache_index):
        return start[:, None] + offsets[None, :]  # (B, T)
    return offsets + start  # (T,)


def write_cache(cache, new, cache_index):
    """`cache` `(B, S, ...)` with `new` `(B, T, ...)` written at each row's positions.

    A scalar index writes one slice; per-row indices scatter `B * T` rows (positions must
    lie inside the cache: the caller keeps finished rows in range).
    """
    if not is_per_row(cache_index):
        zero = ops.zeros((), "int32")
        index = ops.cast(cache_index, "int32")
        start = (zero, index) + (zero,) * (len(cache.shape) - 2)
        return ops.slice_update(cache, start, ops.cast(new, cache.dtype))
    b, t = ops.shape(new)[0], ops.shape(new)[1]
    rows = ops.broadcast_to(ops.arange(b, dtype="int32")[:, None], (b, t))  # (B, T)
    where = ops.stack([rows, query_positions(cache_index, t)], axis=-1)  # (B, T, 2)
    where = ops.reshape(where, (b * t, 2))  # (B*T, 2)
    values = ops.reshape(ops.cast(new, cache.dtype), (b * t, *cache.shape[2:]))  # (B*T, ...)
    return ops.scatter_update(cache, where, values)


def visible(q_positions, k_positions):
    """Causal mask `(B or 1, T, S)`: key `s` is visible to query `t` when it is not later.

    Args:
        q_positions: `(T,)` or `(B, T)` query positions.
        k_positions: `(S,)` key positions (cache slots not yet written hold positions
            beyond every query and so are masked too).
    """
    if len(q_positions.shape) == 1:
        q_positions = q_positions[None, :]  # (1, T)
    return k_positions[None, None, :] <= q_positions[:, :, None]  # (B|1, T, S)
