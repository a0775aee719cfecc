"""Next-token sampling: greedy, temperature, top-k, top-p (XLA-friendly, dynamic k/p)."""

from __future__ import annotations

import tensorflow as tf

NEG_INF = -1e9


def sample_next(logits, temperature, top_k, top_p, seed):
    """Picks one token per row of `logits` `(B, V)`.

    Args:
        logits: `(B, V)` float32.
        temperature: scalar; `<= 0` means greedy (argmax).
        top_k: scalar int; keep the `k` most likely tokens (`<= 0`: all).
        top_p: scalar float; keep the smallest set whose probability reaches
            `p` (`>= 1`: all).
        seed: `(2,)` int32 seed of the stateless sampler (vary it per step).

    Returns:
        `(B,)` int32 token ids.
    """
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    vocab = tf.shape(logits)[-1]
    scaled = logits / tf.maximum(tf.cast(temperature, tf.float32), 1e-6)
    ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")  # (B, V)
    k = tf.where(top_k > 0, tf.minimum(tf.cast(top_k, tf.int32), vocab), vocab)
    kth = tf.gather(ordered, k - 1, axis=-1)[:, None]  # (B, 1)
    ordered = tf.where(ordered < kth, NEG_INF, ordered)
    probs = tf.nn.softmax(ordered, axis=-1)
    before = tf.cumsum(probs, axis=-1, exclusive=True)  # probability of better tokens
    kept = before < tf.cast(top_p, tf.float32)  # the best token is always kept
    threshold = tf.reduce_min(tf.where(kept, ordered, -NEG_INF), axis=-1, keepdims=True)
    threshold = tf.maximum(threshold, kth)
    filtered = tf.where(scaled < threshold, NEG_INF, scaled)
    sampled = tf.random.stateless_categorical(filtered, 1, seed, dtype=tf.int32)[:, 0]
    return tf.where(temperature > 0, sampled, greedy)
