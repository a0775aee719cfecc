"""`Dense` that trains against int8-rounded weights and inputs (quantisation-aware training)."""

from __future__ import annotations

import keras
from keras import ops

INT8_MAX = 127.0


def fake_quant(x, axis: int):
    """Symmetric int8 round trip along `axis` with a straight-through gradient.

    The forward value is `round(x * s) / s` with `s = 127 / (max|x| + eps)` taken
    over `axis`, exactly the grid `keras.quantizers.AbsMaxQuantizer` (and so
    `model.quantize("int8")`) uses; the backward pass treats the rounding as the
    identity (straight-through estimator).
    """
    scale = INT8_MAX / (ops.max(ops.abs(x), axis=axis, keepdims=True) + keras.config.epsilon())
    scale = ops.stop_gradient(scale)
    rounded = ops.clip(ops.round(x * scale), -INT8_MAX, INT8_MAX) / scale
    return x + ops.stop_gradient(rounded - x)


@keras.saving.register_keras_serializable(package="deepseek_tf")
class FakeQuantDense(keras.layers.Dense):
    """A `Dense` whose forward pass sees int8-quantised kernel and inputs.

    Keras 3 has post-training `model.quantize("int8")` but no quantisation-aware
    training (tensorflow-model-optimization only serves tf_keras), hence this
    layer. It simulates Keras' int8 `Dense` exactly: per-output-channel absmax
    scales for the kernel (axis 0) and per-token absmax scales for the inputs
    (last axis). Its variables are those of a plain `Dense`, so a QAT model's
    weights load into the float model that `model.quantize("int8")` converts.

    Args:
        units: output width.
        use_bias: add a (float) bias after the quantised matmul.
        kernel_initializer: the kernel's initialiser.
        **kwargs: other `keras.layers.Dense` arguments (`dtype`, `name`, ...).

    Call arguments:
        inputs: `(..., in_features)`.

    Examples:
    >>> layer = FakeQuantDense(4, use_bias=False)
    >>> layer(keras.ops.ones((2, 3))).shape
    TensorShape([2, 4])
    """

    def __init__(
        self, units: int, use_bias: bool = True, kernel_initializer="glorot_uniform", **kwargs
    ):
        super().__init__(units, use_bias=use_bias, kernel_initializer=kernel_initializer, **kwargs)

    def call(self, inputs, training=None):
        kernel = fake_quant(self.kernel, axis=0)  # (in, out): one scale per output
        x = fake_quant(inputs, axis=-1)  # (..., in): one scale per token
        y = ops.matmul(x, ops.cast(kernel, x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y) if self.activation is not None else y
