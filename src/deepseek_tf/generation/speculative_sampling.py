"""Speculative sampling's acceptance rule and its draws (see `generation.speculative`).

Every distribution here is the one plain decoding samples from (`sampler.filter_logits`:
temperature, top-k, top-p; the argmax's one-hot for a greedy row), so a kept draft or a
residual draw is an exact sample of the target model's next token.
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.generation.sampler import NEG_INF, filter_logits, uniform_noise

# Position offsets that give drafting, acceptance tests and residual draws their own
# noise streams (plain sampling uses the position itself).
DRAFT_NOISE, ACCEPT_NOISE, RESIDUAL_NOISE = 1 << 28, 2 << 28, 3 << 28


def token_probs(logits, temperature, top_k, top_p):
    """`(N, V)` the distribution `sample_tokens` draws from, per row: the softmax of the
    filtered logits, or the argmax's one-hot for `temperature <= 0`."""
    probs = tf.nn.softmax(filter_logits(logits, temperature, top_k, top_p), axis=-1)
    greedy = tf.one_hot(tf.argmax(logits, axis=-1), tf.shape(logits)[-1], dtype=tf.float32)
    return tf.where(tf.cast(temperature, tf.float32)[:, None] > 0, probs, greedy)


def sample_probs(probs, seeds, positions):
    """`(N,)` int32 Gumbel-max draws from `(N, V)` probabilities (keyed by seed and
    position, see `uniform_noise`)."""
    logp = tf.where(probs > 0, tf.math.log(tf.maximum(probs, 1e-30)), NEG_INF)  # (N, V)
    noise = uniform_noise(seeds, positions, tf.shape(probs)[-1])
    return tf.argmax(logp - tf.math.log(-tf.math.log(noise)), axis=-1, output_type=tf.int32)


def accept_drafts(logits, drafts, q, forced, sampling, first, sampled=True):
    """Verifies `k` drafts of each row.

    Args:
        logits: `(B, k+1, V)` main-model logits at positions `first-1 .. first+k-1`.
        drafts: `(B, k)` int32 drafted tokens for positions `first .. first+k-1`.
        q: `(B, k, V)` the distributions they were drawn from (unused when greedy).
        forced: `(B, k+1)` bool: prompt positions (always accepted).
        sampling: `(temperature, top_k, top_p, seeds)`, each `(B,)`.
        first: int32, the position of the first draft: a scalar or per row `(B,)`.
        sampled: False when every row is greedy (the argmax rule alone is traced).

    Returns:
        `(accepted (B,), replacement (B, k+1))`: how many leading drafts each row keeps,
        and the token each position takes when its draft is rejected (index `k`: the
        bonus token after `k` accepted drafts).
    """
    temperature, top_k, top_p, seeds = sampling
    b, t = tf.shape(logits)[0], tf.shape(logits)[1]  # t = k + 1
    argmax = tf.argmax(logits, axis=-1, output_type=tf.int32)  # (B, k+1)

    def greedy():
        return tf.cast(drafts == argmax[:, :-1], tf.float32), argmax

    def speculative_sampling():
        flat = tf.reshape(logits, (b * t, -1))  # (B*(k+1), V)
        p = token_probs(flat, *(tf.repeat(x, t) for x in (temperature, top_k, top_p)))
        p = tf.reshape(p, tf.shape(logits))  # (B, k+1, V)
        p_d = tf.gather(p[:, :-1], drafts, axis=2, batch_dims=2)  # (B, k)
        q_d = tf.gather(q, drafts, axis=2, batch_dims=2)  # (B, k)
        positions = tf.reshape(first, (-1, 1)) + tf.range(t)[None, :]  # (B|1, k+1)
        flat_positions = tf.reshape(tf.broadcast_to(positions, (b, t)), (-1,))  # (B*(k+1),)
        flat_seeds = tf.repeat(seeds, t)  # (B*(k+1),)
        u = uniform_noise(flat_seeds, flat_positions + ACCEPT_NOISE, 1)
        u = tf.reshape(u, (b, t))[:, :-1]  # (B, k)
        residual = tf.nn.relu(p[:, :-1] - q)  # (B, k, V)
        empty = tf.reduce_sum(residual, axis=-1, keepdims=True) <= 0  # p == q: never used
        residual = tf.concat([tf.where(empty, p[:, :-1], residual), p[:, -1:]], axis=1)
        residual = residual / tf.reduce_sum(residual, axis=-1, keepdims=True)
        flat = tf.reshape(residual, (b * t, -1))  # (B*(k+1), V)
        replacement = sample_probs(flat, flat_seeds, flat_positions + RESIDUAL_NOISE)
        return tf.cast(u * q_d < p_d, tf.float32), tf.reshape(replacement, (b, t))

    ok, replacement = speculative_sampling() if sampled else greedy()
    ok = tf.maximum(ok, tf.cast(forced[:, :-1], tf.float32))  # (B, k)
    accepted = tf.cast(tf.reduce_sum(tf.math.cumprod(ok, axis=1), axis=1), tf.int32)
    return accepted, replacement
