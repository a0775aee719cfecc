"""Training-time data augmentation (off by default): token replacement, length jitter.

All randomness is stateless: every draw is keyed by a seed derived from the data seed
and the global batch index, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import math

import tensorflow as tf

from deepseek_tf.config.schema import DataConfig
from deepseek_tf.errors import ConfigError

# Stream tags keep the seeds of unrelated random draws apart.
STREAM_OFFSET = 1  # per-epoch, per-file start offsets (pipeline)
STREAM_SHUFFLE = 2  # per-epoch block permutation (pipeline)
STREAM_REPLACE = 3  # token replacement
STREAM_JITTER = 4  # length jitter


def derive_seed(seed: int, stream: int, index: tf.Tensor | int) -> tf.Tensor:
    """A stateless-RNG seed, shape (2,) int64, from (data seed, stream tag, index)."""
    base = tf.constant([seed, stream], dtype=tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def jittered_length(seq_len: int, frac: float) -> int:
    """Longest jittered sequence: ceil(seq_len * (1 + frac))."""
    # Rounding first keeps float noise (10 * 1.1 = 11.000000000000002) from adding a token.
    return math.ceil(round(seq_len * (1.0 + frac), 9))


def min_jitter_length(seq_len: int, frac: float) -> int:
    """Shortest jittered sequence: floor(seq_len * (1 - frac))."""
    return math.floor(round(seq_len * (1.0 - frac), 9))


def check_augment_config(data_cfg: DataConfig) -> None:
    """Raise ConfigError (naming the key) for augmentation settings that cannot work."""
    if data_cfg.seq_len < 1:
        raise ConfigError(f"data.seq_len must be >= 1, got {data_cfg.seq_len}")
    if data_cfg.token_replace and not 0.0 <= data_cfg.token_replace_prob <= 1.0:
        raise ConfigError(
            f"data.token_replace_prob must be in [0, 1], got {data_cfg.token_replace_prob}"
        )
    if data_cfg.length_jitter:
        frac = data_cfg.length_jitter_frac
        if not 0.0 <= frac < 1.0 or min_jitter_length(data_cfg.seq_len, frac) < 1:
            raise ConfigError(
                f"data.length_jitter_frac must be in [0, 1) and leave at least one token "
                f"of seq_len {data_cfg.seq_len}, got {frac}"
            )


def packed_length(data_cfg: DataConfig) -> int:
    """Tokens per training sequence: seq_len, or ceil(seq_len * (1 + frac)) with jitter on.

    The model's max_seq_len must be at least this.
    """
    return data_cfg.packed_length()


def replace_tokens(inputs: tf.Tensor, prob: float, vocab_size: int, seed: tf.Tensor) -> tf.Tensor:
    """Replace each id of `inputs` by a uniform random id in [0, vocab_size) with prob `prob`.

    `inputs` is int32 of any shape (the model inputs only, never the targets); `seed` is
    a stateless seed of shape (2,). The replacement id may equal the original one.
    """
    inputs = tf.convert_to_tensor(inputs)
    seeds = tf.random.experimental.stateless_split(seed, num=2)  # (2, 2)
    shape = tf.shape(inputs)
    coin = tf.random.stateless_uniform(shape, seed=seeds[0])  # same shape as inputs
    random_ids = tf.random.stateless_uniform(
        shape, seed=seeds[1], minval=0, maxval=vocab_size, dtype=inputs.dtype
    )
    return tf.where(coin < prob, random_ids, inputs)


def jitter_weights(batch: tf.Tensor, seq_len: int, frac: float, seed: tf.Tensor) -> tf.Tensor:
    """Loss weights emulating a random effective length per sequence.

    `batch` is the (B, P) inputs batch, P = ceil(seq_len * (1 + frac)). Each row draws a
    length L uniformly in [floor(seq_len * (1 - frac)), P]; positions >= L get weight 0.
    Returns float32 (B, P).
    """
    shape = tf.shape(batch)  # (B, P)
    low = min_jitter_length(seq_len, frac)
    high = jittered_length(seq_len, frac)
    lengths = tf.random.stateless_uniform(
        shape[:1], seed=seed, minval=low, maxval=high + 1, dtype=tf.int32
    )  # (B,)
    positions = tf.range(shape[1], dtype=tf.int32)  # (P,)
    return tf.cast(positions[None, :] < lengths[:, None], tf.float32)  # (B, P)


def augment_batch(
    data_cfg: DataConfig, vocab_size: int, batch_index: tf.Tensor, inputs: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(inputs, weights) for global batch `batch_index` with the enabled augmentations."""
    weights = tf.ones(tf.shape(inputs), tf.float32)  # (B, P)
    if data_cfg.token_replace:
        seed = derive_seed(data_cfg.seed, STREAM_REPLACE, batch_index)
        inputs = replace_tokens(inputs, data_cfg.token_replace_prob, vocab_size, seed)
    if data_cfg.length_jitter:
        seed = derive_seed(data_cfg.seed, STREAM_JITTER, batch_index)
        weights = jitter_weights(inputs, data_cfg.seq_len, data_cfg.length_jitter_frac, seed)
    return inputs, weights
