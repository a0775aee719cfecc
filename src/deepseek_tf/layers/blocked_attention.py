"""Causal attention in memory linear in the sequence length: blocked, online softmax.

`attention.causal_attention` forms every `(T, S)` score at once, `(B, H, T, S)` floats
(and the dynamic-attention bias an `(H, T, S)` tensor): at 32k tokens that is 4 GiB per
head and layer before the backward pass keeps it. `blocked_attention` computes the same
function one block of keys at a time (FlashAttention's online softmax: Dao et al. 2022,
Rabe & Staats 2021): a running maximum, normaliser and output per query, so the largest
temporary is `(B, H, T, block)`. The dynamic-attention bias is looked up per block from
its `(buckets, H)` table, never whole.

Its gradient is FlashAttention's backward, written out (`tf.custom_gradient`): the
forward keeps only the output and each query's log-sum-exp; the backward recomputes each
block's probabilities from them. Autodiff through the loop would keep every block's
probabilities, i.e. the `(B, H, T, S)` tensor again. TensorFlow has no fused
memory-efficient attention on CPU, and Keras 3's `ops.dot_product_attention` takes a
whole `(T, S)` mask and bias, so none serves here.

The plain path stays the reference: tests check this one against it in values and in
gradients (queries, keys, values and the bias table).
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.layers.relative_position_bias import relative_buckets

NEG_INF = -1e9  # as `attention.NEG_INF`: a masked score (exp underflows to 0)
FAR = 2**30  # the position of a padding key: after every query, so always masked


def _bias_block(table, buckets: tuple[int, int], q_positions, k_positions, hkv: int, groups: int):
    """The dynamic-attention bias of one key block, `(B|1, Hkv, G, T, blk)` float32."""
    distance = q_positions[..., :, None] - k_positions[None, :]  # ([B,] T, blk)
    ids = relative_buckets(distance, *buckets)
    bias = tf.gather(table, ids)  # ([B,] T, blk, H)
    if len(ids.shape) == 2:
        bias = bias[None]  # (1, T, blk, H)
    t, blk = tf.shape(bias)[1], tf.shape(bias)[2]
    bias = tf.transpose(bias, (0, 3, 1, 2))  # (B|1, H, T, blk)
    return tf.reshape(bias, (-1, hkv, groups, t, blk)), ids


def _bias_table_grad(ds, ids, n_buckets: int):
    """`d loss / d table` `(buckets, H)` from one block's score gradient `ds`
    `(B, Hkv, G, T, blk)` and its bucket ids `([B,] T, blk)`."""
    b, hkv, g, t, blk = (tf.shape(ds)[i] for i in range(5))
    ds = tf.reshape(ds, (b, hkv * g, t, blk))  # (B, H, T, blk)
    if len(ids.shape) == 2:  # shared positions: one bucket map for every row
        ds = tf.reduce_sum(ds, axis=0)[None]  # (1, H, T, blk)
        ids = ids[None]  # (1, T, blk)
    data = tf.transpose(ds, (0, 2, 3, 1))  # (B|1, T, blk, H)
    return tf.math.unsorted_segment_sum(data, ids, n_buckets)  # (buckets, H)


def blocked_attention(
    q,
    k,
    v,
    q_positions,
    k_positions,
    scale: float,
    bias_table=None,
    bias_buckets: tuple[int, int] | None = None,
    block_size: int = 512,
):
    """`causal_attention` one block of keys at a time (memory linear in `S`).

    Args:
        q: `(B, T, H, D)` queries.
        k, v: `(B, S, Hkv, D)` keys / `(B, S, Hkv, Dv)` values, `H % Hkv == 0`.
        q_positions: `(T,)` absolute positions of the queries, or `(B, T)` per row.
        k_positions: `(S,)` absolute positions of the keys (later ones are masked).
        scale: softmax temperature (usually `1 / sqrt(D)`).
        bias_table: optional `(num_buckets, H)` dynamic-attention table
            (`RelativePositionBias.table`): the bias of query `t` and key `s` is
            `table[bucket(q_t - k_s), h]`, as `RelativePositionBias` computes it whole.
        bias_buckets: `(num_buckets, max_distance)` of the table.
        block_size: keys per block (the largest temporary is `(B, H, T, block_size)`).

    Returns:
        `(B, T, H, Dv)` in the dtype of `v`; differentiable in `q`, `k`, `v` and
        `bias_table`, with a backward pass of the same memory.

    Examples:
    >>> q = tf.random.normal((1, 6, 2, 4)); k = v = tf.random.normal((1, 6, 2, 4))
    >>> pos = tf.range(6)
    >>> blocked_attention(q, k, v, pos, pos, 0.5, block_size=4).shape
    TensorShape([1, 6, 2, 4])
    """
    out_dtype = v.dtype
    b, t, h, d = (tf.shape(q)[i] for i in range(4))
    hkv, dv = k.shape[2], v.shape[3]
    groups = q.shape[2] // hkv
    s = tf.shape(k)[1]
    n_blocks = (s + block_size - 1) // block_size
    pad = n_blocks * block_size - s
    # (B, Hkv, G, T, D) queries; (n, B, Hkv, blk, D) key and value blocks
    q5 = tf.transpose(tf.reshape(tf.cast(q, tf.float32), (b, t, hkv, groups, d)), (0, 2, 3, 1, 4))

    def blocks(x, depth):
        x = tf.pad(tf.cast(x, tf.float32), [[0, 0], [0, pad], [0, 0], [0, 0]])
        x = tf.reshape(x, (b, n_blocks, block_size, hkv, depth))
        return tf.transpose(x, (1, 0, 3, 2, 4))  # (n, B, Hkv, blk, depth)

    k_pos = tf.reshape(
        tf.concat([tf.cast(k_positions, tf.int32), tf.fill((pad,), FAR)], 0), (n_blocks, block_size)
    )
    q_pos = tf.cast(q_positions, tf.int32)
    has_bias = bias_table is not None
    table = tf.cast(bias_table, tf.float32) if has_bias else tf.zeros((1, h), tf.float32)

    def scores(q5, k_blk, table, i):
        """One block's masked scores `(B, Hkv, G, T, blk)` and its bucket ids."""
        x = tf.einsum("bkgtd,bksd->bkgts", q5, k_blk) * scale
        ids = None
        if has_bias:
            bias, ids = _bias_block(table, bias_buckets, q_pos, k_pos[i], hkv, groups)
            x = x + bias
        rows = q_pos if len(q_pos.shape) == 2 else q_pos[None]  # (B|1, T)
        mask = k_pos[i][None, None, :] <= rows[:, :, None]  # (B|1, T, blk)
        return tf.where(mask[:, None, None], x, NEG_INF), ids

    @tf.custom_gradient
    def attend(q5, k_blocks, v_blocks, table):
        def step(i, m, norm, o):
            x, _ = scores(q5, k_blocks[i], table, i)
            m_new = tf.maximum(m, tf.reduce_max(x, axis=-1))  # (B, Hkv, G, T)
            p = tf.exp(x - m_new[..., None])
            alpha = tf.exp(m - m_new)
            o = o * alpha[..., None] + tf.einsum("bkgts,bksd->bkgtd", p, v_blocks[i])
            return i + 1, m_new, norm * alpha + tf.reduce_sum(p, axis=-1), o

        stats = tf.shape(q5)[:4]  # (B, Hkv, G, T)
        start = (
            0,
            tf.fill(stats, -float("inf")),
            tf.zeros(stats),
            tf.zeros(tf.concat([stats, [dv]], 0)),
        )
        _, m, norm, o = tf.while_loop(lambda i, *_: i < n_blocks, step, start)
        out = o / norm[..., None]  # (B, Hkv, G, T, Dv)
        lse = m + tf.math.log(norm)  # (B, Hkv, G, T)

        def grad(d_out):
            delta = tf.reduce_sum(d_out * out, axis=-1)  # (B, Hkv, G, T)

            def back(i, dq, dk, dv_, dtable):
                x, ids = scores(q5, k_blocks[i], table, i)
                p = tf.exp(x - lse[..., None])  # this block's probabilities
                dv_ = dv_.write(i, tf.einsum("bkgts,bkgtd->bksd", p, d_out))
                ds = p * (tf.einsum("bkgtd,bksd->bkgts", d_out, v_blocks[i]) - delta[..., None])
                dq = dq + tf.einsum("bkgts,bksd->bkgtd", ds, k_blocks[i]) * scale
                dk = dk.write(i, tf.einsum("bkgts,bkgtd->bksd", ds, q5) * scale)
                if has_bias:
                    dtable = dtable + _bias_table_grad(ds, ids, bias_buckets[0])
                return i + 1, dq, dk, dv_, dtable

            arrays = [tf.TensorArray(tf.float32, size=n_blocks) for _ in range(2)]
            start = (0, tf.zeros_like(q5), *arrays, tf.zeros_like(table))
            _, dq, dk, dv_, dtable = tf.while_loop(lambda i, *_: i < n_blocks, back, start)
            return dq, dk.stack(), dv_.stack(), dtable

        return out, grad

    out = attend(q5, blocks(k, d), blocks(v, dv), table)  # (B, Hkv, G, T, Dv)
    out = tf.reshape(tf.transpose(out, (0, 3, 1, 2, 4)), (b, t, h, dv))  # (B, T, H, Dv)
    return tf.cast(out, out_dtype)
