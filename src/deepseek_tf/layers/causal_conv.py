"""Causal Conv1D branch of the hybrid block, with a decoding state."""

from __future__ import annotations

import keras
from keras import ops

from deepseek_tf.layers.serialization import init_config


@keras.saving.register_keras_serializable(package="deepseek_tf")
class CausalConv1D(keras.layers.Layer):
    """A Conv1D over time that only looks at the current and past tokens.

    The brief's HybridBlock adds `Conv1D(d_model, 3, padding="same")` to the
    attention output; "same" padding lets a token see the next one, which a
    language model must not. Here the input is left-padded by `kernel_size - 1`
    steps instead. During decoding those steps come from a small state (the
    last `kernel_size - 1` inputs), so the branch is cacheable like attention.

    Args:
        d_model: input and output channels.
        kernel_size: number of time steps each output sees (itself included).
        init_std: std of the kernel's normal initialiser.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(B, T, d_model)`.
        state: optional `(B, kernel_size - 1, d_model)`, the inputs preceding
            `x` (zeros at the start of a sequence).

    Returns:
        `(B, T, d_model)`, and the new state when a state was given.

    Examples:
    >>> conv = CausalConv1D(d_model=8, kernel_size=3)
    >>> conv(keras.ops.ones((2, 5, 8))).shape
    TensorShape([2, 5, 8])
    """

    def __init__(self, d_model: int, kernel_size: int = 3, init_std: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.kernel_size = kernel_size
        self.init_std = init_std
        self.conv = keras.layers.Conv1D(
            d_model,
            kernel_size,
            padding="valid",
            use_bias=True,
            kernel_initializer=keras.initializers.RandomNormal(stddev=init_std),
            dtype=self.dtype_policy,
            name="conv",
        )

    def parameter_counts(self) -> tuple[int, int]:
        """`(total, activated)`: the `(k, d, d)` kernel and the bias."""
        total = self.kernel_size * self.d_model * self.d_model + self.d_model
        return total, total

    def build(self, input_shape):
        self.conv.build((input_shape[0], None, self.d_model))

    def init_state(self, batch_size: int):
        return ops.zeros((batch_size, self.kernel_size - 1, self.d_model), self.compute_dtype)

    def call(self, x, state=None):
        k = self.kernel_size - 1
        if state is None:
            padded = ops.pad(x, ((0, 0), (k, 0), (0, 0)))  # (B, T + k - 1, C)
        else:
            padded = ops.concatenate([ops.cast(state, x.dtype), x], axis=1)  # (B, T + k - 1, C)
        out = self.conv(padded)  # (B, T, C)
        if state is None:
            return out
        new_state = padded[:, ops.shape(padded)[1] - k :, :]  # (B, k - 1, C)
        return out, new_state

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
