"""A bias-free projection stored as two low-rank factors."""

from __future__ import annotations

import keras

from deepseek_tf.layers.fake_quant_dense import FakeQuantDense
from deepseek_tf.layers.serialization import init_config


@keras.saving.register_keras_serializable(package="deepseek_tf")
class LowRankDense(keras.layers.Layer):
    """`x @ A @ B` with `A: (in, rank)`, `B: (rank, units)`: a factorised `Dense`.

    Replaces a `(in, units)` kernel by `rank * (in + units)` parameters; worth it
    when `rank < in * units / (in + units)`. `deepseek-tf compress lowrank`
    fills the factors from a truncated SVD of the trained kernel
    (`A = U_r sqrt(S_r)`, `B = sqrt(S_r) V_r^T`). The factors are plain `Dense`
    layers, so Keras' `model.quantize` and QAT reach them like any projection.

    Args:
        units: output width.
        rank: inner width of the factorisation.
        init_std: std of the normal initialiser of both factors.
        fake_quant: train the factors against int8 rounding (see
            `FakeQuantDense`).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(..., in_features)`.

    Examples:
    >>> layer = LowRankDense(units=8, rank=2)
    >>> layer(keras.ops.ones((3, 5))).shape
    TensorShape([3, 8])
    """

    def __init__(
        self, units: int, rank: int, init_std: float = 0.02, fake_quant: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.units = units
        self.rank = rank
        self.init_std = init_std
        self.fake_quant = fake_quant
        factor = FakeQuantDense if fake_quant else keras.layers.Dense
        normal = keras.initializers.RandomNormal(stddev=init_std)
        self.down = factor(
            rank, use_bias=False, kernel_initializer=normal, dtype=self.dtype_policy, name="down"
        )
        self.up = factor(
            units, use_bias=False, kernel_initializer=normal, dtype=self.dtype_policy, name="up"
        )

    def build(self, input_shape):
        self.down.build(input_shape)
        self.up.build((*input_shape[:-1], self.rank))

    def call(self, inputs):
        return self.up(self.down(inputs))  # (..., in) -> (..., rank) -> (..., units)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
