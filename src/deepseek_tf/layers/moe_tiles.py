"""The tiled sparse MoE dispatch used for decoding: assignments laid out in expert-sorted
row tiles, each tile multiplied by its expert's gathered weights (see `DeepSeekMoE`).
Training and prefill use the expert-major capacity dispatch (`moe_capacity`).
"""

from __future__ import annotations

import math

import tensorflow as tf
from keras import ops
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

MAX_AUTO_TILE = 128


def dim(x, axis: int):
    """Static size of `x`'s `axis` when known, else a scalar tensor."""
    size = x.shape[axis]
    return size if size is not None else tf.shape(x)[axis]


def in_xla() -> bool:
    """True while tracing for XLA (`tf.function(jit_compile=True)`, any depth of control
    flow), where every shape must be known at compile time. TensorFlow has no public
    way to ask; its traces for XLA run inside an XLA control-flow context, which this
    internal helper reads."""
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def auto_tile_size(n_assignments, n_experts: int) -> int:
    """Rows per tile of the sparse dispatch when `tile_size=0`.

    Padding every expert's rows to a multiple of `t` adds up to
    `m * (t - 1)` computed rows (`m = min(E, A)`, `A` assignments) while each
    of the `~A / t + m` tiles gathers one expert's weights, and small tiles
    make XLA's batched matmul less efficient. The estimate
    `t = sqrt(16 * (A - m) / m)`, rounded to the nearest power of two in
    `[1, 128]`, was the fastest choice on CPU (64 for `A = 2048 * 6`,
    `E = 64`; see benchmarks/moe_dispatch.py). Decoding (`A <= E`) gets
    `t = 1`: one gathered expert per assignment and no padding rows.
    """
    if not isinstance(n_assignments, int):
        return 32  # unknown at trace time (a dynamic batch): a middle value
    m = max(1, min(n_experts, n_assignments))
    target = (16.0 * (n_assignments - m) / m) ** 0.5
    if target <= 1.0:
        return 1
    return int(min(MAX_AUTO_TILE, 2 ** round(math.log2(target))))


def dispatch_plan(topk_idx, n_experts: int, tile: int, used_only: bool = False, valid=None):
    """Static-shape layout of the `(token, slot)` assignments in expert-sorted row tiles.

    Rows are grouped by expert (in token order within an expert) and every
    expert's group is padded to a multiple of `tile` rows, so that each tile
    belongs to one expert. The number of tiles has the static bound
    `(A + m * (tile - 1)) // tile`, `A = N * k`, `m = min(E, A)`; tiles past
    the used ones hold only padding rows. No sort: an assignment's row within
    its expert is the number of earlier tokens routed to that expert (a
    cumulative sum over tokens; a token uses an expert at most once).

    Args:
        topk_idx: `(N, k)` int32 distinct expert ids per token.
        n_experts: `E`.
        tile: rows per tile.
        used_only: lay out only the tiles the assignments use (a shape known at run
            time, not XLA-compatible); otherwise the static bound, whose unused tiles
            each still gather an expert's weights (a server's 16 decoding slots: 72
            tiles for 96 assignments).
        valid: optional `(N,)` bool: tokens to route; the others take no row (their
            `dest` is `R`, past the last row), so with `used_only` a server's idle
            slots gather no expert's weights.

    Returns:
        A dict: `"row_token"` `(R,)` int32 token of each row (`N` for padding
        rows), `"dest"` `(N, k)` int32 row of each assignment (`R`: not routed),
        `"tile_expert"` `(n_tiles,)` int32 expert of each tile and
        `"n_tiles"` (a scalar tensor with `used_only`); `R = n_tiles * tile`.
    """
    n, k = dim(topk_idx, 0), topk_idx.shape[1]
    a = n * k
    routed = ops.sum(ops.one_hot(topk_idx, n_experts, dtype="int32"), axis=1)  # (N, E) 0/1
    if valid is not None:
        routed = routed * ops.cast(valid, "int32")[:, None]
    before = tf.cumsum(routed, axis=0, exclusive=True)  # (N, E) earlier tokens per expert
    counts = ops.sum(routed, axis=0)  # (E,)
    tiles_per_expert = (counts + tile - 1) // tile  # (E,)
    tile_end = tf.cumsum(tiles_per_expert)  # (E,) first tile after each expert's
    tile_start = tile_end - tiles_per_expert  # (E,)
    rank = tf.gather(before, topk_idx, batch_dims=1)  # (N, k) row within the expert
    dest = tf.gather(tile_start * tile, topk_idx) + rank  # (N, k)

    m = min(n_experts, a) if isinstance(a, int) else tf.minimum(n_experts, a)
    n_tiles = tile_end[-1] if used_only else (a + m * (tile - 1)) // tile
    token = tf.repeat(tf.range(n, dtype=dest.dtype), k)  # (A,) token of each assignment
    if valid is not None:  # the others write (and later read) row R, one past the last
        dest = tf.where(valid[:, None], dest, n_tiles * tile)
    row_token = tf.tensor_scatter_nd_update(
        tf.fill([n_tiles * tile + 1], tf.cast(n, dest.dtype)), ops.reshape(dest, (-1, 1)), token
    )[:-1]  # (R,)
    tiles = tf.range(n_tiles, dtype=dest.dtype)  # (n_tiles,)
    tile_expert = ops.sum(
        ops.cast(tile_end[None, :] <= tiles[:, None], "int32"), axis=1
    )  # (n_tiles,) experts wholly before each tile
    tile_expert = ops.minimum(tile_expert, n_experts - 1)  # unused tiles: any expert
    return {"row_token": row_token, "dest": dest, "tile_expert": tile_expert, "n_tiles": n_tiles}


def token_rows(active, lead_shape):
    """`(B,)` bool rows -> `(N,)` bool tokens of `(B, T)` positions flattened."""
    return ops.reshape(tf.broadcast_to(active[:, None], lead_shape), (-1,))


def gather_rows(rows, index):
    """`rows[index]` of `(R, ...)` rows, zeros where `index` is `R` (a token not routed:
    `dispatch_plan`'s `valid`)."""
    return tf.gather(ops.concatenate([rows, ops.zeros_like(rows[:1])], axis=0), index)
