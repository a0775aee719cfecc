"""The routed experts of one MoE layer computed across replicas (expert parallelism).

Each replica holds `E / N` of the `E` routed experts (`expert_shards`). Inside
`strategy.run` the replicas exchange their tokens and routing with one all-gather,
every replica runs its own experts on the assignments routed to them (the others
are skipped by the capacity dispatch), and an all-reduce sums the partial outputs,
from which each replica keeps its own tokens' rows. Both collectives are
differentiable: the backward pass is the same exchange in reverse, so each shard's
gradient covers the whole global batch, as on one device.

This is the all-gather dispatcher (as Megatron-Core's `MoEAllGatherTokenDispatcher`),
not an all-to-all: every replica receives every token (`R * n * d` values per layer
and direction instead of `k/N` of that). It is what `tf.distribute` exposes for
Keras layers on CPU and GPU; `benchmarks/expert_parallel.py` measures the volume and
models the all-to-all alternative for a large cluster.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from deepseek_tf.layers.expert_shards import shard_of_replica
from deepseek_tf.layers.moe_capacity import capacity_dispatch

CAPACITY_FACTOR = 1.25  # the single-device dispatch's first-round rows over the mean load


def expert_parallel_dispatch(
    tokens, topk_idx, topk_weight, stacks, *, n_experts, shards, return_hidden=False
):
    """This replica's routed output `(n, d)` float32, its experts computing for all,
    and with `return_hidden` the chosen experts' hidden activations `(n, k, h)`
    (statistics: no gradient), else None.

    Args:
        tokens: `(n, d)` this replica's tokens (static `n`).
        topk_idx: `(n, k)` int32 expert ids in `[0, n_experts)`.
        topk_weight: `(n, k)` float32 combine weights.
        stacks: this replica's `(w_gate, w_up, w_down)` shard tensors, `(E/N, d, h)`,
            `(E/N, d, h)` and `(E/N, h, d)`, in `tokens`' dtype.
        n_experts: `E`, all routed experts of the layer.
        shards: `N`, the shards the experts are split into (divides the replicas).
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync
    copies = replicas // shards  # replicas holding each shard
    local = n_experts // shards
    n, d = tokens.shape[0], tokens.shape[1]
    k = topk_idx.shape[1]
    everyone = replicas * n
    all_tokens = tf.reshape(context.all_gather(tokens, axis=0), (everyone, d))  # (R n, d)
    all_idx = tf.reshape(context.all_gather(topk_idx, axis=0), (everyone, k))  # (R n, k)
    all_weight = tf.reshape(context.all_gather(topk_weight, axis=0), (everyone, k))  # (R n, k)
    mine = all_idx - shard_of_replica(shards) * local  # (R n, k) ids within this shard
    here = (mine >= 0) & (mine < local)
    if copies > 1:  # each copy sees 1 / copies of the output gradient (below)
        stacks = [_scale_gradient(w, float(copies)) for w in stacks]
    per_slot, hidden = capacity_dispatch(
        all_tokens,
        tf.where(here, mine, -1),  # -1: another shard's expert, skipped
        *stacks,
        capacity_factor=CAPACITY_FACTOR * local / n_experts,  # rows over this shard's load
        return_hidden=return_hidden,
    )  # (R n, k, d) and (R n, k, h) or None, zero where not here
    weight = all_weight * ops.cast(here, "float32")  # (R n, k)
    partial = ops.einsum("nkd,nk->nd", ops.cast(per_slot, "float32"), weight)  # (R n, d)
    # Every assignment is computed by the `copies` replicas holding its shard: the sum
    # over replicas counts it `copies` times (and each copy's weight gradient, from
    # 1 / copies of the output gradient, is scaled back up above).
    out = context.all_reduce(tf.distribute.ReduceOp.SUM, partial) / copies  # (R n, d)
    start = context.replica_id_in_sync_group * n
    if return_hidden:
        hidden = context.all_reduce(tf.distribute.ReduceOp.SUM, hidden) / copies  # (R n, k, h)
        hidden = tf.stop_gradient(hidden[start : start + n])  # (n, k, h)
    return out[start : start + n], hidden  # (n, d), (n, k, h) or None


def _scale_gradient(x, factor: float):
    """`x`, with its gradient multiplied by `factor`."""

    @tf.custom_gradient
    def identity(x):
        return tf.identity(x), lambda dy: dy * tf.cast(factor, dy.dtype)

    return identity(x)
