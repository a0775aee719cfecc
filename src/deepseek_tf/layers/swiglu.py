"""SwiGLU feed-forward network."""

from __future__ import annotations

import keras
from keras import ops

from deepseek_tf.layers.serialization import init_config
from deepseek_tf.layers.structure import (
    Projection,
    PrunableUnits,
    WeightSlice,
    build_projections,
    make_projections,
    projection_parameters,
)


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

        make_projections(self)  # gate_proj, up_proj, down_proj (see `projections`)

    def projections(self) -> list[Projection]:
        """The layer's projections (see `layers.structure`)."""
        d, h = self.d_model, self.hidden_dim
        return [
            Projection("gate_proj", d, h),
            Projection("up_proj", d, h),
            Projection("down_proj", h, d, output=True),
        ]

    def parameter_counts(self) -> tuple[int, int]:
        """`(total, activated)` parameters, from the constructor arguments alone."""
        total = projection_parameters(self)
        return total, total

    def prunable_units(self) -> list[PrunableUnits]:
        """Hidden channels: `gate_proj`/`up_proj` columns and `down_proj` rows."""
        slices = (
            WeightSlice(self.gate_proj, "kernel", 1, "in"),
            WeightSlice(self.up_proj, "kernel", 1, "in"),
            WeightSlice(self.down_proj, "kernel", 0, "out"),
        )
        return [PrunableUnits("ffn", self.hidden_dim, 1, slices)]

    def build(self, input_shape):
        build_projections(self, input_shape)

    def call(self, x, return_hidden=False):
        hidden = ops.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., hidden_dim)
        out = self.down_proj(hidden)
        return (out, hidden) if return_hidden else out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
