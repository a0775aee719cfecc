"""SwiGLU feed-forward network."""

from __future__ import annotations

import keras
from keras import ops

from deepseek_tf.layers.serialization import init_config, projection


@keras.saving.register_keras_serializable(package="deepseek_tf")
class SwiGLU(keras.layers.Layer):
    """`down(silu(gate(x)) * up(x))`, the feed-forward of Llama and DeepSeek.

    Args:
        d_model: input and output width.
        hidden_dim: width of the gated hidden layer.
        init_std: std of the gate/up projections' normal initialiser.
        output_init_std: std of the down projection's initialiser.
        projection_ranks: `{projection name: rank}`: those projections are
            `LowRankDense` factor pairs (written by `compress lowrank`).
        fake_quant: projections train against int8 rounding (QAT).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(..., d_model)`.
        return_hidden: also return the `(..., hidden_dim)` gated activations
            (the training monitor measures their sparsity).

    Examples:
    >>> ffn = SwiGLU(d_model=8, hidden_dim=16)
    >>> ffn(keras.ops.ones((2, 3, 8))).shape
    TensorShape([2, 3, 8])
    """

    def __init__(
        self,
        d_model: int,
        hidden_dim: int,
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        projection_ranks: dict | None = None,
        fake_quant: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.init_std = init_std
        self.output_init_std = output_init_std
        self.projection_ranks = dict(projection_ranks or {})
        self.fake_quant = fake_quant

        def dense(units, std, name):
            return projection(self, units, std, name)

        self.gate_proj = dense(hidden_dim, init_std, "gate_proj")
        self.up_proj = dense(hidden_dim, init_std, "up_proj")
        self.down_proj = dense(d_model, output_init_std, "down_proj")

    def build(self, input_shape):
        self.gate_proj.build(input_shape)
        self.up_proj.build(input_shape)
        self.down_proj.build((*input_shape[:-1], self.hidden_dim))

    def call(self, x, return_hidden=False):
        hidden = ops.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., hidden_dim)
        out = self.down_proj(hidden)
        return (out, hidden) if return_hidden else out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
