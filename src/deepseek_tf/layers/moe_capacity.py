"""Expert-major dropless MoE dispatch: a capacity buffer plus exact overflow rounds.

The `N * k` (token, slot) assignments are placed expert-major in an `(E, C, d)`
buffer, `C` rows per expert (a static capacity, `capacity_factor` times the mean
load), and the three SwiGLU projections run as batched matmuls against the
stacked expert weights in place -- no per-tile weight gathers, which is what
makes the tiled dispatch (`moe_tiles.dispatch_plan`) cost ~2.5x a dense SwiGLU of the
same active width on CPU. Assignments past an expert's first `C` rows are not
dropped: they run in overflow rounds in `tf.while_loop`s whose trip counts come
from the measured overflow (zero when the load is balanced, the usual case with
DeepSeek-V3's bias balancing): whole rounds of `C` rows while an expert's excess
fills them (one sequence's routing, as in a prefill, is often that skewed), then
rounds of `C/8` rows (at least 8) for the rest. One `tf.custom_gradient` covers all
rounds with a hand-written SwiGLU backward: round 0 reuses its forward
activations, overflow rounds are recomputed inside the backward loop, and
every round accumulates into the same gradient buffers, so an empty overflow
costs (almost) nothing in either pass. The result equals the dense reference.
"""

from __future__ import annotations

import math

import tensorflow as tf


def capacity_rows(n_assignments: int, n_experts: int, capacity_factor: float) -> int:
    """Static rows per expert: `capacity_factor * A / E`, rounded up to a multiple of 8."""
    return max(8, int(math.ceil(capacity_factor * n_assignments / n_experts / 8.0)) * 8)


def assignment_ranks(topk_idx, n_experts: int):
    """`(N, k)` row of each assignment within its expert (token order) and `(E,)` counts.

    An id below 0 (an assignment dispatched elsewhere) counts for no expert."""
    routed = tf.reduce_sum(tf.one_hot(topk_idx, n_experts, dtype=tf.int32), axis=1)  # (N, E)
    before = tf.cumsum(routed, axis=0, exclusive=True)  # (N, E) earlier tokens per expert
    rank = tf.gather(before, tf.maximum(topk_idx, 0), batch_dims=1)  # (N, k)
    return rank, tf.reduce_sum(routed, axis=0)


def _round_slots(flat_e, flat_rank, capacity: int, n_experts: int, lo):
    """Slot of each assignment whose rank is in `[lo, lo + C)`; `E*C` (a dump row) if not."""
    local = flat_rank - lo  # (A,)
    inside = (local >= 0) & (local < capacity) & (flat_e >= 0)
    return tf.where(inside, flat_e * capacity + local, n_experts * capacity)  # (A,)


def _slot_assignments(slots, n_assignments: int, n_slots: int):
    """`(E*C,)` assignment of each buffer slot (`A`, one past the last, when empty)."""
    table = tf.tensor_scatter_nd_update(
        tf.fill([n_slots + 1], n_assignments), slots[:, None], tf.range(n_assignments)
    )  # collisions only on the dump slot E*C, which is cut off
    return table[:-1]


def _masked_gather(table, index, valid):
    """`table[index]` where `valid`, zero elsewhere (no padded copy of the table)."""
    rows = tf.gather(table, tf.minimum(index, table.shape[0] - 1))
    return rows * tf.cast(valid, rows.dtype)[:, None]


def _forward(tokens, weights, slots, assign_of_slot, k, n_experts, capacity, with_hidden=True,
             transposed=False):  # fmt: skip
    """One round's SwiGLU experts: `(A, d)` outputs, `(A, h)` hidden, and what backward needs
    (`transposed`: the stacks are held `(E, out, in)`).

    Empty slots compute on an arbitrary token: no assignment reads their outputs, and their
    output gradients are zero, so they add nothing to any gradient.
    """
    w_gate, w_up, w_down = weights
    n_slots = n_experts * capacity
    token_of_slot = tf.minimum(assign_of_slot // k, tokens.shape[0] - 1)  # (E*C,)
    rows = tf.reshape(tf.gather(tokens, token_of_slot), (n_experts, capacity, -1))  # (E, C, d)
    gate = tf.matmul(rows, w_gate, transpose_b=transposed)  # (E, C, h)
    up = tf.matmul(rows, w_up, transpose_b=transposed)  # (E, C, h)
    act = tf.nn.silu(gate)
    hidden = act * up  # (E, C, h)
    y = tf.matmul(hidden, w_down, transpose_b=transposed)  # (E, C, d)
    inside = slots < n_slots  # (A,) assignments of this round
    out = _masked_gather(tf.reshape(y, (n_slots, -1)), slots, inside)  # (A, d)
    hid = None
    if with_hidden:
        hid = _masked_gather(tf.reshape(hidden, (n_slots, -1)), slots, inside)  # (A, h)
    return out, hid, (rows, gate, up, act, hidden)


def _backward(d_out, weights, slots, assign_of_slot, saved, k: int, n_experts: int, capacity):
    """Gradients of one round w.r.t. `(tokens, w_gate, w_up, w_down)`, SwiGLU by hand.

    Gathers only: each slot takes its assignment's output gradient, each assignment its
    slot's input gradient (XLA's CPU scatter-add, what autodiff of a gather gives, is slow).
    """
    w_gate, w_up, w_down = weights
    rows, gate, up, act, hidden = saved
    n_slots, d = n_experts * capacity, d_out.shape[-1]
    filled = assign_of_slot < d_out.shape[0]  # (E*C,) slots holding an assignment
    dy = _masked_gather(d_out, assign_of_slot, filled)  # (E*C, d)
    dy = tf.reshape(dy, (n_experts, capacity, d))  # (E, C, d)
    d_down = tf.matmul(hidden, dy, transpose_a=True)  # (E, h, d)
    d_hidden = tf.matmul(dy, w_down, transpose_b=True)  # (E, C, h)
    sig = tf.sigmoid(gate)
    d_gate = d_hidden * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = s (1 + g (1 - s))
    d_up = d_hidden * act
    d_wgate = tf.matmul(rows, d_gate, transpose_a=True)  # (E, d, h)
    d_wup = tf.matmul(rows, d_up, transpose_a=True)  # (E, d, h)
    d_rows = tf.matmul(d_gate, w_gate, transpose_b=True) + tf.matmul(d_up, w_up, transpose_b=True)
    d_rows = tf.reshape(d_rows, (n_slots, d))  # (E*C, d)
    d_assign = _masked_gather(d_rows, slots, slots < n_slots)  # (A, d)
    d_tokens = tf.reduce_sum(tf.reshape(d_assign, (-1, k, d)), axis=1)  # (N, d)
    return d_tokens, d_wgate, d_wup, d_down


def capacity_dispatch(
    tokens, topk_idx, w_gate, w_up, w_down, capacity_factor: float = 1.25, return_hidden=False,
    transposed: bool = False,
):  # fmt: skip
    """Outputs `(N, k, d)` of each token's `k` experts, and their hidden activations
    `(N, k, h)` when `return_hidden` (else None; for statistics: no gradient flows back
    through them).

    Args:
        tokens: `(N, d)`.
        topk_idx: `(N, k)` int32 distinct expert ids per token; an id below 0 is an
            assignment not dispatched here (expert parallelism: another replica's
            expert): its output is zero.
        w_gate, w_up: `(E, d, h)` stacked expert weights (tensors); w_down: `(E, h, d)`.
        capacity_factor: rows per expert of the first round, over the mean load.
        return_hidden: also return the hidden activations.
        transposed: the stacks are held `(E, out, in)` (a model in decode layout,
            `generation.decode_layout`); inference only, it has no gradient.
    """
    n, k = tokens.shape[0], topk_idx.shape[1]
    n_experts = w_gate.shape[0]
    if n is None:
        raise ValueError("capacity_dispatch needs a static token count")
    capacity = min(capacity_rows(n * k, n_experts, capacity_factor), n)
    spill = min(max(8, capacity // 8 // 8 * 8), n)  # rows per expert in a small round
    rank, counts = assignment_ranks(topk_idx, n_experts)
    flat_e, flat_rank = tf.reshape(topk_idx, [-1]), tf.reshape(rank, [-1])  # (A,)
    excess = tf.maximum(tf.reduce_max(counts) - capacity, 0)
    # overflow loops `(rows, first rank, trips)`: whole rounds of `capacity` rows while the
    # excess fills them, then rounds of `spill` rows for the rest (fewer, fuller rounds:
    # each costs a plan and three batched matmuls over every expert)
    whole = excess // capacity
    rest = excess - whole * capacity
    loops = [
        (capacity, capacity, whole),
        (spill, capacity * (1 + whole), (rest + spill - 1) // spill),
    ]

    def plan(lo, rows):
        slots = _round_slots(flat_e, flat_rank, rows, n_experts, lo)  # (A,)
        return slots, _slot_assignments(slots, n * k, n_experts * rows)

    def overflow(body, carried):
        """`carried` through `body(slots, table, rows, *carried)` for every overflow round."""
        for rows, lo, trips in loops:

            def step(r, *acc, rows=rows, lo=lo):
                slots, table = plan(lo + r * rows, rows)  # ranks [lo + r rows, + rows)
                return (r + 1, *body(slots, table, rows, *acc))

            _, *carried = tf.while_loop(lambda r, *_, trips=trips: r < trips, step, (0, *carried))
        return carried

    @tf.custom_gradient
    def dispatch(tokens, w_gate, w_up, w_down):
        weights = (w_gate, w_up, w_down)
        slots0, table0 = plan(0, capacity)
        out0, hid0, saved0 = _forward(
            tokens, weights, slots0, table0, k, n_experts, capacity, return_hidden, transposed
        )

        def add_round(slots, table, rows, out, *hid):
            o, h, _ = _forward(
                tokens, weights, slots, table, k, n_experts, rows, return_hidden, transposed
            )
            return (out + o, *((hid[0] + h,) if return_hidden else ()))

        out, *hid = overflow(add_round, (out0, *((hid0,) if return_hidden else ())))

        def grad(d_out, *d_hid):
            del d_hid  # statistics only
            if transposed:
                raise ValueError("capacity_dispatch: stacks held (E, out, in) have no gradient")
            first = _backward(d_out, weights, slots0, table0, saved0, k, n_experts, capacity)

            def add_grads(slots, table, rows, *acc):
                _, _, saved = _forward(tokens, weights, slots, table, k, n_experts, rows)
                g = _backward(d_out, weights, slots, table, saved, k, n_experts, rows)
                return tuple(a + b for a, b in zip(acc, g))

            return overflow(add_grads, first)

        if return_hidden:
            return (out, tf.stop_gradient(hid[0])), grad
        return out, grad

    d, h = (w_down.shape[-2], w_up.shape[-2]) if transposed else (w_down.shape[-1], w_up.shape[-1])
    result = dispatch(tokens, w_gate, w_up, w_down)  # (A, d)[, (A, h)]
    if not return_hidden:
        return tf.reshape(result, (n, k, d)), None
    return tf.reshape(result[0], (n, k, d)), tf.reshape(result[1], (n, k, h))
