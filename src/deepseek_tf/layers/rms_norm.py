"""RMSNorm, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="deepseek_tf")
class RMSNorm(keras.layers.Layer):
    """Root-mean-square layer normalisation (no mean subtraction, no bias).

    `y = x / sqrt(mean(x^2) + epsilon) * scale`, computed in float32 so that
    mixed-precision training stays stable, returned in the compute dtype.

    Args:
        epsilon: added to the mean square before the square root.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`).

    Call arguments:
        x: tensor of shape `(..., features)`.

    Examples:
    >>> norm = RMSNorm(epsilon=1e-6)
    >>> norm(keras.ops.ones((2, 3, 8))).shape
    TensorShape([2, 3, 8])
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="ones", dtype=self.variable_dtype
        )

    def call(self, x):
        x32 = ops.cast(x, "float32")
        inv_rms = ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + self.epsilon)
        y = x32 * inv_rms * ops.cast(self.scale, "float32")
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
