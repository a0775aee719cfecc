"""Rotary position embedding (RoPE) with optional YaRN frequency scaling."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from deepseek_tf.layers.serialization import init_config


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction `0.1 * mscale * ln(scale) + 1`."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """YaRN's cos/sin multiplier, as Hugging Face's `_compute_yarn_parameters` infers it.

    `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are set
    (1 for DeepSeek-V2/V3, whose two values are equal), otherwise
    `mscale(factor, 1)`; 1 without YaRN.
    """
    if factor <= 1.0:
        return 1.0
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


def rope_inv_freq(
    dim: int,
    theta: float,
    scaling_factor: float = 1.0,
    original_max_len: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:
    """Inverse frequencies `(dim // 2,)`; YaRN-blended when `scaling_factor > 1`.

    YaRN keeps high-frequency dimensions (many rotations within the original
    context) unscaled, divides low-frequency ones by `scaling_factor`, and
    ramps linearly in between (Peng et al., 2023; as in DeepSeek-V3).
    """
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv_freq = 1.0 / theta**exponents  # (dim/2,)
    if scaling_factor <= 1.0:
        return inv_freq.astype(np.float32)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_len / (num_rotations * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # 1: keep the original frequency
    blended = inv_freq / scaling_factor * (1.0 - extrapolation) + inv_freq * extrapolation
    return blended.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RotarySettings:
    """The RoPE/YaRN set-up of an attention layer, written once for `CausalSelfAttention`
    and `MultiHeadLatentAttention`: the fields are those layers' constructor arguments of
    the same names (see `RotaryEmbedding` and `yarn_attention_factor`).

    Examples:
    >>> rope = RotarySettings(rope_scaling_factor=40.0, yarn_mscale_all_dim=1.0)
    >>> round(rope.softmax_factor, 4)  # multiplies 1 / sqrt(head_dim)
    1.8739
    >>> rope.embedding(8).attention_factor  # mscale / mscale_all_dim
    1.0
    """

    rope_theta: float = 10000.0
    rope_layout: str = "half"
    rope_scaling_factor: float = 1.0
    rope_original_max_len: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0

    def copy_to(self, layer) -> None:
        """Sets the settings as `layer`'s attributes of the same names (its `get_config`
        reads them back)."""
        for field in dataclasses.fields(self):
            setattr(layer, field.name, getattr(self, field.name))

    @property
    def softmax_factor(self) -> float:
        """What YaRN multiplies the softmax scale by: `mscale(factor, mscale_all_dim)**2`
        when `yarn_mscale_all_dim` is set, else 1 (also without YaRN)."""
        if self.rope_scaling_factor > 1.0 and self.yarn_mscale_all_dim:
            return yarn_get_mscale(self.rope_scaling_factor, self.yarn_mscale_all_dim) ** 2
        return 1.0

    def embedding(self, head_dim: int, **kwargs) -> RotaryEmbedding:
        """The `RotaryEmbedding` rotating `head_dim` features (`kwargs`: layer arguments
        such as `dtype` and `name`)."""
        factor = self.rope_scaling_factor
        return RotaryEmbedding(
            head_dim,
            theta=self.rope_theta,
            layout=self.rope_layout,
            scaling_factor=factor,
            original_max_len=self.rope_original_max_len,
            beta_fast=self.yarn_beta_fast,
            beta_slow=self.yarn_beta_slow,
            attention_factor=yarn_attention_factor(
                factor, self.yarn_mscale, self.yarn_mscale_all_dim
            ),
            **kwargs,
        )


@keras.saving.register_keras_serializable(package="deepseek_tf")
class RotaryEmbedding(keras.layers.Layer):
    """Rotates query/key features by position-dependent angles (RoPE).

    Args:
        head_dim: size of the rotated feature axis (even).
        theta: RoPE base.
        layout: `"half"` rotates `x[:d/2]` against `x[d/2:]` (Llama/HF);
            `"interleaved"` rotates adjacent pairs `(x0, x1), (x2, x3)` (the
            DeepSeek-V3 reference).
        scaling_factor: YaRN context-extension factor; 1 disables YaRN.
        original_max_len: context length the base frequencies were trained on.
        beta_fast, beta_slow: YaRN ramp boundaries (in rotations).
        attention_factor: multiplies cos/sin (YaRN's mscale ratio); 1 for none.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(B, T, H, head_dim)` queries or keys.
        positions: `(T,)` int32 absolute positions of the `T` tokens, or `(B, T)`
            per row.

    Examples:
    >>> rope = RotaryEmbedding(head_dim=8)
    >>> rope(keras.ops.ones((1, 4, 2, 8)), keras.ops.arange(4)).shape
    TensorShape([1, 4, 2, 8])
    """

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        layout: str = "half",
        scaling_factor: float = 1.0,
        original_max_len: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if layout not in ("half", "interleaved"):
            raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
        self.head_dim = head_dim
        self.theta = theta
        self.layout = layout
        self.scaling_factor = scaling_factor
        self.original_max_len = original_max_len
        self.beta_fast = beta_fast
        self.beta_slow = beta_slow
        self.attention_factor = attention_factor
        self._inv_freq = None  # computed on first use: an unbuilt model allocates nothing

    @property
    def inv_freq(self):
        """`(head_dim / 2,)` float64 rotation frequencies (computed on first use)."""
        if self._inv_freq is None:
            self._inv_freq = rope_inv_freq(
                self.head_dim,
                self.theta,
                self.scaling_factor,
                self.original_max_len,
                self.beta_fast,
                self.beta_slow,
            )
        return self._inv_freq

    def call(self, x, positions):
        inv_freq = ops.convert_to_tensor(self.inv_freq, "float32")
        angles = ops.expand_dims(ops.cast(positions, "float32"), -1) * inv_freq  # ([B,] T, D/2)
        cos = ops.expand_dims(ops.cos(angles), -2) * self.attention_factor  # ([B,] T, 1, D/2)
        sin = ops.expand_dims(ops.sin(angles), -2) * self.attention_factor
        x32 = ops.cast(x, "float32")
        if self.layout == "half":
            x1, x2 = ops.split(x32, 2, axis=-1)  # (B, T, H, D/2) each
            out = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        else:
            shape = ops.shape(x32)
            pairs = ops.reshape(x32, (*shape[:-1], self.head_dim // 2, 2))  # (B, T, H, D/2, 2)
            xe, xo = pairs[..., 0], pairs[..., 1]
            rotated = ops.stack([xe * cos - xo * sin, xe * sin + xo * cos], axis=-1)
            out = ops.reshape(rotated, shape)  # (B, T, H, D)
        return ops.cast(out, x.dtype)

    def compute_output_shape(self, input_shape, positions_shape=None):
        return input_shape

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
