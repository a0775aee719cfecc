"""The brief's "dynamic attention": a learned, position-sensitive attention bias."""

from __future__ import annotations

import math

import keras
from keras import ops

from deepseek_tf.layers.serialization import init_config


def relative_buckets(distance, num_buckets: int, max_distance: int):
    """Maps causal distances `q_pos - k_pos >= 0` to bucket ids.

    The first half of the buckets holds exact distances; the second half is
    log-spaced up to `max_distance`, beyond which everything shares the last
    bucket (as in T5's relative attention, one-directional).
    """
    distance = ops.maximum(distance, 0)
    max_exact = max(num_buckets // 2, 1)
    is_small = distance < max_exact
    log_ratio = ops.log(ops.maximum(ops.cast(distance, "float32"), 1.0) / max_exact) / math.log(
        max(max_distance / max_exact, 1.0 + 1e-6)
    )
    large = max_exact + ops.cast(log_ratio * (num_buckets - max_exact), "int32")
    large = ops.minimum(large, num_buckets - 1)
    return ops.where(is_small, distance, large)


@keras.saving.register_keras_serializable(package="deepseek_tf")
class RelativePositionBias(keras.layers.Layer):
    """Per-head attention bias looked up from relative-distance buckets.

    Distances are built with `tf.range` (`ops.arange`) and the bias with
    `tf.gather` (`ops.take`) over a learned `(num_buckets, num_heads)` table, so
    the same table serves any sequence length and any cache position.

    Args:
        num_heads: number of attention heads (one bias per head and bucket).
        num_buckets: number of distance buckets.
        max_distance: distances at or beyond this share the last bucket.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        q_positions: `(T,)` int32 absolute query positions, or `(B, T)` per row.
        k_positions: `(S,)` int32 absolute key positions.

    Returns:
        `(num_heads, T, S)` (per row `(B, num_heads, T, S)`) float32 bias added to
        the attention logits.

    Examples:
    >>> bias = RelativePositionBias(num_heads=2, num_buckets=8, max_distance=16)
    >>> bias(keras.ops.arange(3), keras.ops.arange(5)).shape
    TensorShape([2, 3, 5])
    """

    def __init__(self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance

    def build(self, *args, **kwargs):
        self.table = self.add_weight(
            name="table", shape=(self.num_buckets, self.num_heads), initializer="zeros"
        )

    def call(self, q_positions, k_positions):
        distance = ops.expand_dims(q_positions, -1) - k_positions  # ([B,] T, S)
        buckets = relative_buckets(distance, self.num_buckets, self.max_distance)
        bias = ops.take(ops.cast(self.table, "float32"), buckets, axis=0)  # ([B,] T, S, H)
        if len(q_positions.shape) == 2:  # per-row positions
            return ops.transpose(bias, (0, 3, 1, 2))  # (B, H, T, S)
        return ops.transpose(bias, (2, 0, 1))  # (H, T, S)

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
