"""Causal multi-head / grouped-query self-attention with a KV cache."""

from __future__ import annotations

import math

import keras
from keras import ops

from deepseek_tf.layers.blocked_attention import blocked_attention
from deepseek_tf.layers.cache_positions import query_positions, visible, write_cache
from deepseek_tf.layers.relative_position_bias import RelativePositionBias
from deepseek_tf.layers.rotary import RotarySettings
from deepseek_tf.layers.serialization import init_config
from deepseek_tf.layers.structure import (
    Projection,
    PrunableUnits,
    WeightSlice,
    build_projections,
    make_projections,
    projection_parameters,
)

NEG_INF = -1e9


def causal_attention(q, k, v, q_positions, k_positions, scale, bias=None):
    """Scaled dot-product attention; keys at positions after a query are masked.

    Args:
        q: `(B, T, H, D)` queries.
        k, v: `(B, S, Hkv, D)` keys / `(B, S, Hkv, Dv)` values, `H % Hkv == 0`.
        q_positions: `(T,)` absolute positions of the queries, or `(B, T)` per row.
        k_positions: `(S,)` absolute positions of the keys. Cache slots not yet
            written hold positions beyond every query and so are masked too.
        scale: softmax temperature (usually `1 / sqrt(D)`).
        bias: optional `(H, T, S)` (or per row `(B, H, T, S)`) float32 additive bias.

    Returns:
        `(B, T, H, Dv)` in the dtype of `v`.
    """
    b, t, h, d = ops.shape(q)
    hkv = ops.shape(k)[2]
    groups = h // hkv
    q = ops.reshape(q, (b, t, hkv, groups, d))  # (B, T, Hkv, G, D)
    scores = ops.einsum("btkgd,bskd->bkgts", q, k)  # (B, Hkv, G, T, S)
    scores = ops.cast(scores, "float32") * scale
    if bias is not None:
        s = ops.shape(bias)[-1]
        scores = scores + ops.reshape(bias, (-1, hkv, groups, t, s))  # (B|1, Hkv, G, T, S)
    mask = visible(q_positions, k_positions)[:, None, None]  # (B|1, 1, 1, T, S)
    scores = ops.where(mask, scores, NEG_INF)
    probs = ops.cast(ops.softmax(scores, axis=-1), v.dtype)
    out = ops.einsum("bkgts,bskd->btkgd", probs, v)  # (B, T, Hkv, G, Dv)
    return ops.reshape(out, (b, t, h, ops.shape(v)[-1]))  # (B, T, H, Dv)


def runs_blocked(q, blocked_above: int) -> bool:
    """Whether a call with queries `q` `(B, T, ...)` attends in blocks: more than
    `blocked_above` queries (`0`: never; a query count unknown when traced: never)."""
    t = q.shape[1]
    return bool(blocked_above) and t is not None and t > blocked_above


def attend(q, k, v, q_positions, k_positions, scale, *, relative_bias=None, blocked_above=0,
           block_size=512):  # fmt: skip
    """`causal_attention`, or `blocked_attention` (the same function in memory linear in
    `S`) when more than `blocked_above` queries attend (`0`: never; an unknown query
    count: never). `relative_bias`: the layer's `RelativePositionBias`, or None."""
    if runs_blocked(q, blocked_above):
        table, buckets = None, None
        if relative_bias is not None:  # looked up per block from its table
            table = relative_bias.table
            buckets = (relative_bias.num_buckets, relative_bias.max_distance)
        return blocked_attention(
            q, k, v, q_positions, k_positions, scale, table, buckets, block_size
        )
    bias = None if relative_bias is None else relative_bias(q_positions, k_positions)
    return causal_attention(q, k, v, q_positions, k_positions, scale, bias)  # (B, T, H, Dv)


@keras.saving.register_keras_serializable(package="deepseek_tf")
class CausalSelfAttention(keras.layers.Layer):
    """Causal MHA/GQA with RoPE and/or a learned relative bias, and a KV cache.

    Args:
        d_model: input and output width.
        n_heads: query heads.
        n_kv_heads: key/value heads (`n_heads` for MHA; a divisor for GQA).
        head_dim: features per head.
        position: `"rope"`, `"dynamic"` (learned relative-distance bias) or
            `"rope+dynamic"`.
        rope_theta, rope_layout, rope_scaling_factor, rope_original_max_len,
        yarn_beta_fast, yarn_beta_slow: see `RotaryEmbedding`.
        yarn_mscale, yarn_mscale_all_dim: YaRN attention-temperature terms.
        bias_buckets, bias_max_distance: see `RelativePositionBias`.
        blocked_above, block_size: calls with more queries than `blocked_above` (0:
            never) attend `block_size` keys at a time (`blocked_attention`).
        init_std: std of the normal initialiser of the projections.
        output_init_std: std of the output projection's initialiser.
        projection_ranks: `{projection name: rank}`: those projections are
            `LowRankDense` factor pairs (written by `compress lowrank`).
        fake_quant: projections train against int8 rounding (QAT).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(B, T, d_model)`.
        cache: optional dict `{"k": (B, S, Hkv, D), "v": (B, S, Hkv, D)}`.
        cache_index: int32 scalar, position of `x[:, 0]` (with a cache), or a
            `(B,)` vector of per-row positions (rows of a continuous batch).

    Returns:
        `(B, T, d_model)`, and the updated cache when a cache was given.

    Examples:
    >>> attn = CausalSelfAttention(d_model=16, n_heads=4, n_kv_heads=2, head_dim=4)
    >>> attn(keras.ops.ones((2, 5, 16))).shape
    TensorShape([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        position: str = "rope",
        rope_theta: float = 10000.0,
        rope_layout: str = "half",
        rope_scaling_factor: float = 1.0,
        rope_original_max_len: int = 4096,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_mscale: float = 1.0,
        yarn_mscale_all_dim: float = 0.0,
        bias_buckets: int = 32,
        bias_max_distance: int = 128,
        blocked_above: int = 2048,
        block_size: int = 512,
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        projection_ranks: dict | None = None,
        fake_quant: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.position = position
        rotary = RotarySettings(
            rope_theta, rope_layout, rope_scaling_factor, rope_original_max_len,
            yarn_beta_fast, yarn_beta_slow, yarn_mscale, yarn_mscale_all_dim,
        )  # fmt: skip
        rotary.copy_to(self)
        self.bias_buckets = bias_buckets
        self.bias_max_distance = bias_max_distance
        self.blocked_above = blocked_above
        self.block_size = block_size
        self.init_std = init_std
        self.output_init_std = output_init_std
        self.projection_ranks = dict(projection_ranks or {})
        self.fake_quant = fake_quant

        self.scale = 1.0 / math.sqrt(head_dim) * rotary.softmax_factor

        make_projections(self)  # q_proj, k_proj, v_proj, o_proj (see `projections`)
        self.rope = None
        if "rope" in position:
            self.rope = rotary.embedding(head_dim, dtype=self.dtype_policy, name="rope")
        self.relative_bias = None
        if "dynamic" in position:
            self.relative_bias = RelativePositionBias(
                n_heads, bias_buckets, bias_max_distance, dtype=self.dtype_policy, name="rel_bias"
            )

    def projections(self) -> list[Projection]:
        """The layer's projections (see `layers.structure`)."""
        d, h, hkv, hd = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        return [
            Projection("q_proj", d, h * hd),
            Projection("k_proj", d, hkv * hd),
            Projection("v_proj", d, hkv * hd),
            Projection("o_proj", h * hd, d, output=True),
        ]

    def parameter_counts(self) -> tuple[int, int]:
        """`(total, activated)` parameters, from the constructor arguments alone."""
        total = projection_parameters(self)
        if self.relative_bias is not None:
            total += self.bias_buckets * self.n_heads  # the (buckets, H) table
        return total, total

    def prunable_units(self) -> list[PrunableUnits]:
        """Whole kv groups: one kv head with the `n_heads / n_kv_heads` query heads that read
        it (query columns are laid out `(Hkv, G, D)`, key/value columns `(Hkv, D)`)."""
        slices = [WeightSlice(getattr(self, n), "kernel", 1, "in") for n in ("q_proj", "k_proj")]
        slices += [
            WeightSlice(self.v_proj, "kernel", 1, "in"),
            WeightSlice(self.o_proj, "kernel", 0, "out"),
        ]
        if self.relative_bias is not None:
            slices.append(WeightSlice(self.relative_bias, "table", 1, None))  # (buckets, H)
        group = self.n_heads // self.n_kv_heads
        return [PrunableUnits("heads", self.n_kv_heads, 1, tuple(slices), heads_per_unit=group)]

    def build(self, input_shape):
        build_projections(self, input_shape)
        if self.relative_bias is not None:
            self.relative_bias.build()

    def cache_values_per_token(self) -> int:
        """Values this layer caches per decoded token: its keys and values."""
        return 2 * self.n_kv_heads * self.head_dim

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        shape = (batch_size, max_len, self.n_kv_heads, self.head_dim)
        return {
            "k": ops.zeros(shape, self.compute_dtype),
            "v": ops.zeros(shape, self.compute_dtype),
        }

    def call(self, x, cache=None, cache_index=None):
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        q_positions = query_positions(cache_index, t)  # (T,) or per row (B, T)
        q = ops.reshape(self.q_proj(x), (b, t, self.n_heads, self.head_dim))  # (B, T, H, D)
        k = ops.reshape(self.k_proj(x), (b, t, self.n_kv_heads, self.head_dim))  # (B, T, Hkv, D)
        v = ops.reshape(self.v_proj(x), (b, t, self.n_kv_heads, self.head_dim))  # (B, T, Hkv, D)
        if self.rope is not None:
            q = self.rope(q, q_positions)
            k = self.rope(k, q_positions)
        if cache is not None:
            k = write_cache(cache["k"], k, cache_index)  # (B, S, Hkv, D)
            v = write_cache(cache["v"], v, cache_index)  # (B, S, Hkv, Dv)
            cache = {**cache, "k": k, "v": v}
            k_positions = ops.arange(ops.shape(k)[1], dtype="int32")  # (S,)
        else:
            k_positions = q_positions  # (T,): without a cache, keys are the new tokens
        out = attend(
            q, k, v, q_positions, k_positions, self.scale, relative_bias=self.relative_bias,
            blocked_above=self.blocked_above, block_size=self.block_size,
        )  # (B, T, H, D)  # fmt: skip
        out = self.o_proj(ops.reshape(out, (b, t, self.n_heads * self.head_dim)))  # (B, T, C)
        return out if cache is None else (out, cache)

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
