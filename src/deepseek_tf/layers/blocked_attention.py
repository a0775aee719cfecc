"""Causal attention in memory linear in the sequence length: blocked, online softmax.

`attention.causal_attention` forms every `(T, S)` score at once, `(B, H, T, S)` floats
(and the dynamic-attention bias an `(H, T, S)` tensor): at 32k tokens that is 4 GiB per
head and layer before the backward pass keeps it. `blocked_attention` computes the same
function one `(query block, key block)` tile at a time (FlashAttention's online softmax:
Dao et al. 2022, Rabe & Staats 2021): a running maximum, normaliser and output per
query, so the largest temporary is `(B, H, block, block)`; tiles wholly in a query
block's future are skipped (about half of them in training). The dynamic-attention bias
is looked up per tile from its `(buckets, H)` table, never whole.

Its gradient is FlashAttention's backward, written out (`tf.custom_gradient`): the
forward keeps only the output and each query's log-sum-exp; the backward recomputes each
tile's probabilities from them, once for the keys' and values' gradients (key blocks
outside, their query blocks inside) and once for the queries'. Autodiff through the
loops would keep every tile's probabilities, i.e. the `(B, H, T, S)` tensor again.
TensorFlow has no fused memory-efficient attention on CPU, and Keras 3's
`ops.dot_product_attention` takes a whole `(T, S)` mask and bias, so none serves here.

The plain path stays the reference: tests check this one against it in values and in
gradients (queries, keys, values and the bias table).
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.layers.relative_position_bias import relative_buckets

NEG_INF = -1e9  # as `attention.NEG_INF`: a masked score (exp underflows to 0)
FAR = 2**30  # the position of a padding key: after every query, so always masked


def _bias_block(by_distance, q_positions, k_positions, hkv: int, groups: int):
    """The dynamic-attention bias of one tile, `(B|1, Hkv, G, T, blk)` float32, and the
    distances it was read at, `([B,] T, blk)`. `by_distance` `(M + 1, H)` is the bias of
    each causal distance `0 ... M` (`M`: the table's `max_distance`, beyond which every
    distance shares the last bucket)."""
    distance = q_positions[..., :, None] - k_positions[None, :]  # ([B,] T, blk)
    ids = tf.clip_by_value(distance, 0, tf.shape(by_distance)[0] - 1)
    bias = tf.gather(by_distance, ids)  # ([B,] T, blk, H)
    if len(ids.shape) == 2:
        bias = bias[None]  # (1, T, blk, H)
    t, blk = tf.shape(bias)[1], tf.shape(bias)[2]
    bias = tf.transpose(bias, (0, 3, 1, 2))  # (B|1, H, T, blk)
    return tf.reshape(bias, (-1, hkv, groups, t, blk)), ids


def _bias_grad(ds, ids, n: int):
    """`d loss / d by_distance` `(n, H)` from one tile's score gradient `ds`
    `(B, Hkv, G, T, blk)` and the distances its bias was read at `([B,] T, blk)`."""
    b, hkv, g, t, blk = (tf.shape(ds)[i] for i in range(5))
    ds = tf.reshape(ds, (b, hkv * g, t, blk))  # (B, H, T, blk)
    if len(ids.shape) == 2:  # shared positions: one distance map for every row
        ds = tf.reduce_sum(ds, axis=0)[None]  # (1, H, T, blk)
        ids = ids[None]  # (1, T, blk)
    data = tf.transpose(ds, (0, 2, 3, 1))  # (B|1, T, blk, H)
    return tf.math.unsorted_segment_sum(data, ids, n)  # (n, H)


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
    """`causal_attention` one tile of queries and keys at a time (memory linear in `T`, `S`).

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
        block_size: queries and keys per block (the largest temporary is
            `(B, H, block_size, block_size)`). Positions must rise along each row (as
            in training, prefill and a KV cache) for the skipped tiles to be the masked
            ones.

    Returns:
        `(B, T, H, Dv)` in the dtype of `v`; differentiable in `q`, `k`, `v` and
        `bias_table`, with a backward pass of the same memory.

    Examples:
    >>> q = tf.random.normal((1, 6, 2, 4)); k = v = tf.random.normal((1, 6, 2, 4))
    >>> pos = tf.range(6)
    >>> blocked_attention(q, k, v, pos, pos, 0.5, block_size=4).shape
    TensorShape([1, 6, 2, 4])
    """
    out_dtype, hkv, dv = v.dtype, k.shape[2], v.shape[3]
    groups = q.shape[2] // hkv
    b, t, d, s = tf.shape(q)[0], tf.shape(q)[1], tf.shape(q)[3], tf.shape(k)[1]
    n_q, n_k = (t + block_size - 1) // block_size, (s + block_size - 1) // block_size

    def padded(x, length, n, values=0):  # (B, L, ...) -> (B, n * block, ...)
        pads = [[0, 0], [0, n * block_size - length]] + [[0, 0]] * (len(x.shape) - 2)
        return tf.pad(x, pads, constant_values=values)

    def blocks(x, n, order):  # (B, n * block, Hkv, [G,] depth) -> (n, ...) in `order`
        x = tf.reshape(x, (b, n, block_size, *x.shape[2:]))
        return tf.transpose(x, order)

    q6 = tf.reshape(tf.cast(q, tf.float32), (b, t, hkv, groups, d))  # (B, T, Hkv, G, D)
    q_blocks = blocks(padded(q6, t, n_q), n_q, (1, 0, 3, 4, 2, 5))  # (nq, B, Hkv, G, blk, D)
    k_blocks = blocks(padded(tf.cast(k, tf.float32), s, n_k), n_k, (1, 0, 3, 2, 4))
    v_blocks = blocks(padded(tf.cast(v, tf.float32), s, n_k), n_k, (1, 0, 3, 2, 4))
    # positions: a padding key after every query; a padding query repeats the last one
    k_pos = tf.reshape(padded(tf.cast(k_positions, tf.int32)[None], s, n_k, FAR), (n_k, -1))
    rows = tf.cast(q_positions, tf.int32)
    rows = rows if len(rows.shape) == 2 else rows[None]  # (B|1, T)
    rows = tf.concat([rows, tf.repeat(rows[:, -1:], n_q * block_size - t, axis=1)], 1)
    q_pos = tf.transpose(tf.reshape(rows, (-1, n_q, block_size)), (1, 0, 2))  # (nq, B|1, blk)
    if len(q_positions.shape) == 1:
        q_pos = q_pos[:, 0]  # (nq, blk): shared by every row
    # causal blocks: query block i sees key blocks [0, seen[i]); key block j is seen by
    # query blocks [first[j], nq) (positions rise along a row)
    last_q = tf.reduce_max(tf.reshape(q_pos, (n_q, -1)), axis=1)  # (nq,)
    seen = tf.reduce_sum(tf.cast(k_pos[None, :, 0] <= last_q[:, None], tf.int32), axis=1)
    first = tf.reduce_sum(tf.cast(last_q[None, :] < k_pos[:, :1], tf.int32), axis=1)
    has_bias = bias_table is not None
    table = tf.cast(bias_table, tf.float32) if has_bias else tf.zeros((1, 1), tf.float32)
    # each causal distance's bucket, once: a tile then gathers its bias by distance
    n_buckets, max_distance = bias_buckets if has_bias else (1, 0)
    bucket_of = relative_buckets(tf.range(max_distance + 1), n_buckets, max_distance)

    def scores(q_blk, i, j, by_distance):
        """Query block i's masked scores against key block j, `(B, Hkv, G, blk, blk)`,
        and the bucket ids of its bias."""
        x = tf.einsum("bkgtd,bksd->bkgts", q_blk, k_blocks[j]) * scale
        ids = None
        if has_bias:
            bias, ids = _bias_block(by_distance, q_pos[i], k_pos[j], hkv, groups)
            x = x + bias
        mine = q_pos[i] if len(q_pos.shape) == 3 else q_pos[i][None]  # (B|1, blk)
        mask = k_pos[j][None, None, :] <= mine[:, :, None]  # (B|1, blk, blk)
        return tf.where(mask[:, None, None], x, NEG_INF), ids

    def loop(n, body, state):
        return tf.while_loop(lambda j, *_: j < n, body, (0, *state))[1:]

    @tf.custom_gradient
    def attend(q_blocks, _k_blocks, _v_blocks, table):  # (scores reads k, v blocks)
        by_distance = tf.gather(table, bucket_of)  # (M + 1, H)

        def query_block(i, outs, lses):
            q_blk = q_blocks[i]
            stats = tf.shape(q_blk)[:4]  # (B, Hkv, G, blk)

            def key_block(j, m, norm, o):
                x, _ = scores(q_blk, i, j, by_distance)
                m_new = tf.maximum(m, tf.reduce_max(x, axis=-1))  # (B, Hkv, G, blk)
                p = tf.exp(x - m_new[..., None])
                alpha = tf.exp(m - m_new)
                o = o * alpha[..., None] + tf.einsum("bkgts,bksd->bkgtd", p, v_blocks[j])
                return j + 1, m_new, norm * alpha + tf.reduce_sum(p, axis=-1), o

            start = (tf.fill(stats, -float("inf")), tf.zeros(stats),
                     tf.zeros(tf.concat([stats, [dv]], 0)))  # fmt: skip
            m, norm, o = loop(seen[i], key_block, start)
            return i + 1, outs.write(i, o / norm[..., None]), lses.write(i, m + tf.math.log(norm))

        arrays = [tf.TensorArray(tf.float32, size=n_q) for _ in range(2)]
        outs, lses = loop(n_q, query_block, arrays)
        out, lse = outs.stack(), lses.stack()  # (nq, B, Hkv, G, blk, Dv), (nq, B, Hkv, G, blk)

        def grad(d_out):
            delta = tf.reduce_sum(d_out * out, axis=-1)  # (nq, B, Hkv, G, blk)

            def probs(i, j):  # block (i, j)'s probabilities and their bucket ids
                x, ids = scores(q_blocks[i], i, j, by_distance)
                return tf.exp(x - lse[i][..., None]), ids

            def score_grad(p, i, j):  # d loss / d score of block (i, j)
                dp = tf.einsum("bkgtd,bksd->bkgts", d_out[i], v_blocks[j])
                return p * (dp - delta[i][..., None])

            def keys(j, dks, dvs, dbias):  # key block j's gradients, over its query blocks
                def query(i, dk, dv_, dbias):
                    p, ids = probs(i, j)
                    ds = score_grad(p, i, j)
                    dv_ = dv_ + tf.einsum("bkgts,bkgtd->bksd", p, d_out[i])
                    dk = dk + tf.einsum("bkgts,bkgtd->bksd", ds, q_blocks[i]) * scale
                    if has_bias:
                        dbias = dbias + _bias_grad(ds, ids, max_distance + 1)
                    return i + 1, dk, dv_, dbias

                init = (first[j], tf.zeros_like(k_blocks[j]), tf.zeros_like(v_blocks[j]), dbias)
                _, dk, dv_, dbias = tf.while_loop(lambda i, *_: i < n_q, query, init)
                return j + 1, dks.write(j, dk), dvs.write(j, dv_), dbias

            def queries(i, dqs):  # query block i's gradient, over the key blocks it sees
                def key(j, dq):
                    p, _ = probs(i, j)
                    return j + 1, dq + tf.einsum(
                        "bkgts,bksd->bkgtd", score_grad(p, i, j), k_blocks[j]
                    ) * scale

                (dq,) = loop(seen[i], key, (tf.zeros_like(q_blocks[i]),))
                return i + 1, dqs.write(i, dq)

            arrays = [tf.TensorArray(tf.float32, size=n_k) for _ in range(2)]
            dks, dvs, d_by_distance = loop(n_k, keys, (*arrays, tf.zeros_like(by_distance)))
            dtable = tf.math.unsorted_segment_sum(d_by_distance, bucket_of, n_buckets)
            (dqs,) = loop(n_q, queries, (tf.TensorArray(tf.float32, size=n_q),))
            return dqs.stack(), dks.stack(), dvs.stack(), dtable

        return out, grad

    out = attend(q_blocks, k_blocks, v_blocks, table)  # (nq, B, Hkv, G, blk, Dv)
    out = tf.reshape(tf.transpose(out, (1, 0, 4, 2, 3, 5)), (b, n_q * block_size, -1, dv))
    return tf.cast(out[:, :t], out_dtype)  # (B, T, H, Dv)
