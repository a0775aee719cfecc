"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a naive or an absorbed KV cache."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from deepseek_tf.layers.attention import NEG_INF, attend, runs_blocked
from deepseek_tf.layers.blocked_attention import blocked_attention
from deepseek_tf.layers.cache_positions import query_positions, visible, write_cache
from deepseek_tf.layers.rms_norm import RMSNorm
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


def mla_cache_values_per_token(
    n_heads: int,
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    absorb: bool = True,
) -> int:
    """Values one layer caches per token.

    Absorbed decoding caches the normed latent and the shared roped key,
    `kv_lora_rank + qk_rope_head_dim` values (576 for DeepSeek-V3); naive
    decoding caches full per-head keys and values,
    `n_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)` (40960).
    """
    if absorb:
        return kv_lora_rank + qk_rope_head_dim
    return n_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)


class _Derived:
    """Holds variables derived from a layer's weights outside Keras' and TensorFlow's
    tracking (a plain object: never saved in a checkpoint or counted as a weight)."""

    values: list | None = None


def head_product(x, w):
    """Each head's vector times its matrix: `(B, T, H, in)` through `w` `(H, in, out)` ->
    `(B, T, H, out)`, computed in `w`'s dtype (float32 kernels of a model in
    `generation.decode_layout`: `prepare_decoding`) and returned in `x`'s."""
    out = ops.einsum("bthi,hio->btho", ops.cast(x, w.dtype), w)
    return ops.cast(out, x.dtype)


@keras.saving.register_keras_serializable(package="deepseek_tf")
class MultiHeadLatentAttention(keras.layers.Layer):
    """Causal multi-head latent attention (DeepSeek-V2/V3 MLA) with a KV cache.

    Keys and values are up-projected from one low-rank latent per token
    (`kv_lora_rank` wide, RMS-normed); position enters through a decoupled
    RoPE part: each query head has `qk_rope_head_dim` roped features and all
    heads share a single roped key of that width. Queries are optionally
    low-rank too (`q_lora_rank > 0`). Sub-layers are named after the Hugging
    Face checkpoint (`q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`,
    `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`); Keras
    kernels are the transposes of the torch weights.

    The uncached forward pass is the plain ("naive") computation. Decoding
    with a cache runs one of two paths:

    - naive (`absorb=False`): caches full per-head keys `(qk_nope + qk_rope)`
      and values `v_head_dim`, like MHA.
    - absorbed (`absorb=True`): caches only the normed latent and the roped
      shared key; `kv_b_proj`'s key half is folded into the query
      (`q_nope @ W_UK`) and its value half applied after attention
      (`(probs @ latent) @ W_UV`), as DeepSeek-V3's reference inference does.

    Args:
        d_model: input and output width.
        n_heads: attention heads.
        q_lora_rank: query latent width; 0 for a plain `q_proj`.
        kv_lora_rank: key/value latent width (cached by the absorbed path).
        qk_nope_head_dim: per-head query/key features without position.
        qk_rope_head_dim: per-head roped query features, and width of the
            shared roped key.
        v_head_dim: per-head value features.
        rope_theta: RoPE base.
        rope_layout: `"interleaved"` (DeepSeek's published models: feature pairs
            `(2i, 2i + 1)` rotate together) or `"half"` (rotate-half).
        rope_scaling_factor: YaRN context-extension factor; 1 disables YaRN.
        rope_original_max_len, yarn_beta_fast, yarn_beta_slow: see
            `RotaryEmbedding`.
        yarn_mscale, yarn_mscale_all_dim: YaRN temperature terms (Hugging
            Face `mscale`, `mscale_all_dim`). With YaRN the softmax scale is
            multiplied by `yarn_get_mscale(factor, yarn_mscale_all_dim) ** 2`
            when `yarn_mscale_all_dim` is set, and cos/sin by
            `yarn_attention_factor(factor, yarn_mscale, yarn_mscale_all_dim)`.
        norm_eps: epsilon of the two latent RMSNorms.
        absorb: decode from the compressed latent cache (True) or from a cache
            of full keys and values (False).
        blocked_above, block_size: calls with more queries than `blocked_above` (0:
            never) attend `block_size` keys at a time (`blocked_attention`), on either
            path.
        init_std: std of the normal initialiser of the projections.
        output_init_std: std of the output projection's initialiser.
        projection_ranks: `{projection name: rank}`: those projections are
            `LowRankDense` factor pairs (written by `compress lowrank`);
            `kv_b_proj` is never factorised (absorbed decoding folds it).
        fake_quant: projections other than `kv_b_proj` train against int8
            rounding (QAT).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(B, T, d_model)`.
        cache: optional dict from `init_cache`: `{"kv": (B, S, kv_lora_rank),
            "pe": (B, S, qk_rope_head_dim)}` when absorbing, else
            `{"k": (B, S, H, qk_nope + qk_rope), "v": (B, S, H, v_head_dim)}`.
        cache_index: int32 scalar, position of `x[:, 0]` (with a cache), or a
            `(B,)` vector of per-row positions (rows of a continuous batch).

    Returns:
        `(B, T, d_model)`, and the updated cache when a cache was given.

    Examples:
    >>> mla = MultiHeadLatentAttention(
    ...     d_model=32, n_heads=4, q_lora_rank=16, kv_lora_rank=8,
    ...     qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    >>> mla(keras.ops.ones((2, 5, 32))).shape
    TensorShape([2, 5, 32])
    >>> cache = mla.init_cache(batch_size=2, max_len=16)
    >>> out, cache = mla(keras.ops.ones((2, 1, 32)), cache=cache, cache_index=0)
    >>> cache["kv"].shape, mla.cache_values_per_token()
    (TensorShape([2, 16, 8]), 12)
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        q_lora_rank: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rope_theta: float = 10000.0,
        rope_layout: str = "interleaved",
        rope_scaling_factor: float = 1.0,
        rope_original_max_len: int = 4096,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_mscale: float = 1.0,
        yarn_mscale_all_dim: float = 0.0,
        norm_eps: float = 1e-6,
        absorb: bool = True,
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
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        rotary = RotarySettings(
            rope_theta, rope_layout, rope_scaling_factor, rope_original_max_len,
            yarn_beta_fast, yarn_beta_slow, yarn_mscale, yarn_mscale_all_dim,
        )  # fmt: skip
        rotary.copy_to(self)
        self.norm_eps = norm_eps
        self.absorb = absorb
        self.blocked_above = blocked_above
        self.block_size = block_size
        self.init_std = init_std
        self.output_init_std = output_init_std
        self.projection_ranks = dict(projection_ranks or {})
        self.fake_quant = fake_quant

        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = self.qk_head_dim**-0.5 * rotary.softmax_factor  # as Hugging Face's

        make_projections(self)  # see `projections`
        if q_lora_rank > 0:
            self.q_a_layernorm = RMSNorm(norm_eps, dtype=self.dtype_policy, name="q_a_layernorm")
        self.kv_a_layernorm = RMSNorm(norm_eps, dtype=self.dtype_policy, name="kv_a_layernorm")
        self.rope = rotary.embedding(qk_rope_head_dim, dtype=self.dtype_policy, name="rope")
        self._absorbed_kernels = _Derived()  # see `prepare_decoding`

    def projections(self) -> list[Projection]:
        """The layer's projections (see `layers.structure`). `kv_b_proj` is neither
        factorised nor quantized: absorbed decoding folds its float kernel into the query
        and the output."""
        d, h = self.d_model, self.n_heads
        rank, rope = self.kv_lora_rank, self.qk_rope_head_dim
        if self.q_lora_rank > 0:
            query = [
                Projection("q_a_proj", d, self.q_lora_rank),
                Projection("q_b_proj", self.q_lora_rank, h * self.qk_head_dim),
            ]
        else:
            query = [Projection("q_proj", d, h * self.qk_head_dim)]
        kv_b = h * (self.qk_nope_head_dim + self.v_head_dim)
        return [
            *query,
            Projection("kv_a_proj_with_mqa", d, rank + rope),
            Projection("kv_b_proj", rank, kv_b, factorizable=False, quantizable=False),
            Projection("o_proj", h * self.v_head_dim, d, output=True),
        ]

    def parameter_counts(self) -> tuple[int, int]:
        """`(total, activated)` parameters, from the constructor arguments alone."""
        total = projection_parameters(self) + self.q_lora_rank + self.kv_lora_rank  # + norms
        return total, total

    def prunable_units(self) -> list[PrunableUnits]:
        """Single heads: query columns `(H, Dn + Dr)`, `kv_b_proj` columns `(H, Dn + Dv)`,
        `o_proj` rows `(H, Dv)`."""
        query = self.q_b_proj if self.q_lora_rank > 0 else self.q_proj
        slices = (
            WeightSlice(query, "kernel", 1, "in"),
            WeightSlice(self.kv_b_proj, "kernel", 1, "in"),
            WeightSlice(self.o_proj, "kernel", 0, "out"),
        )
        return [PrunableUnits("heads", self.n_heads, 1, slices)]

    def build(self, input_shape):
        lead = tuple(input_shape[:-1])
        build_projections(self, input_shape)
        if self.q_lora_rank > 0:
            self.q_a_layernorm.build((*lead, self.q_lora_rank))
        self.kv_a_layernorm.build((*lead, self.kv_lora_rank))

    def cache_values_per_token(self) -> int:
        """Values this layer caches per token on its decoding path (see `absorb`)."""
        return mla_cache_values_per_token(
            self.n_heads,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            self.absorb,
        )

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        dtype = self.compute_dtype
        if self.absorb:
            return {
                "kv": ops.zeros((batch_size, max_len, self.kv_lora_rank), dtype),
                "pe": ops.zeros((batch_size, max_len, self.qk_rope_head_dim), dtype),
            }
        return {
            "k": ops.zeros((batch_size, max_len, self.n_heads, self.qk_head_dim), dtype),
            "v": ops.zeros((batch_size, max_len, self.n_heads, self.v_head_dim), dtype),
        }

    def call(self, x, cache=None, cache_index=None):
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        h, nope, rope_dim = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q_positions = query_positions(cache_index, t)  # (T,) or per row (B, T)

        if self.q_lora_rank > 0:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, H*Dqk)
        else:
            q = self.q_proj(x)  # (B, T, H*Dqk)
        q = ops.reshape(q, (b, t, h, self.qk_head_dim))  # (B, T, H, Dqk)
        q_nope = q[..., :nope]  # (B, T, H, Dn)
        q_pe = self.rope(q[..., nope:], q_positions)  # (B, T, H, Dr)

        kv_a = self.kv_a_proj_with_mqa(x)  # (B, T, R + Dr)
        latent = self.kv_a_layernorm(kv_a[..., : self.kv_lora_rank])  # (B, T, R)
        k_pe = ops.reshape(kv_a[..., self.kv_lora_rank :], (b, t, 1, rope_dim))  # (B, T, 1, Dr)
        k_pe = self.rope(k_pe, q_positions)  # (B, T, 1, Dr)

        if cache is not None and self.absorb:
            out, cache = self._absorbed(q_nope, q_pe, latent, k_pe, q_positions, cache, cache_index)
        else:
            out, cache = self._naive(q_nope, q_pe, latent, k_pe, q_positions, cache, cache_index)
        out = self.o_proj(ops.reshape(out, (b, t, h * self.v_head_dim)))  # (B, T, C)
        return out if cache is None else (out, cache)

    def _naive(self, q_nope, q_pe, latent, k_pe, q_positions, cache, cache_index):
        """Up-project keys/values for every head, then plain attention."""
        b, t = ops.shape(latent)[0], ops.shape(latent)[1]
        h, nope = self.n_heads, self.qk_nope_head_dim
        kv = self.kv_b_proj(latent)  # (B, T, H*(Dn+Dv))
        kv = ops.reshape(kv, (b, t, h, nope + self.v_head_dim))  # (B, T, H, Dn+Dv)
        k_nope, v = kv[..., :nope], kv[..., nope:]  # (B, T, H, Dn), (B, T, H, Dv)
        k_pe = ops.broadcast_to(k_pe, (b, t, h, self.qk_rope_head_dim))  # (B, T, H, Dr)
        k = ops.concatenate([k_nope, k_pe], axis=-1)  # (B, T, H, Dqk)
        q = ops.concatenate([q_nope, q_pe], axis=-1)  # (B, T, H, Dqk)
        if cache is not None:
            k = write_cache(cache["k"], k, cache_index)  # (B, S, H, Dqk)
            v = write_cache(cache["v"], v, cache_index)  # (B, S, H, Dv)
            cache = {**cache, "k": k, "v": v}
            k_positions = ops.arange(ops.shape(k)[1], dtype="int32")  # (S,)
        else:
            k_positions = q_positions  # (T,)
        out = attend(
            q, k, v, q_positions, k_positions, self.scale,
            blocked_above=self.blocked_above, block_size=self.block_size,
        )  # (B, T, H, Dv)  # fmt: skip
        return out, cache

    def _absorbed(self, q_nope, q_pe, latent, k_pe, q_positions, cache, cache_index):
        """Attend over the cached latent; `kv_b_proj` folded into query and output."""
        kv = write_cache(cache["kv"], latent, cache_index)  # (B, S, R)
        pe = write_cache(cache["pe"], k_pe[:, :, 0], cache_index)  # (B, S, Dr)
        cache = {**cache, "kv": kv, "pe": pe}

        w_uk, w_uv = self._absorbed_kernels.values or self.absorbed_kernels()
        q_latent = head_product(q_nope, w_uk)  # (B, T, H, R)
        if runs_blocked(q_latent, self.blocked_above):  # a long prefill
            # one key head (MQA): queries [q_latent, q_pe], keys [latent, pe], values latent
            q = ops.concatenate([q_latent, q_pe], axis=-1)  # (B, T, H, R + Dr)
            k = ops.concatenate([kv, pe], axis=-1)[:, :, None]  # (B, S, 1, R + Dr)
            k_positions = ops.arange(ops.shape(kv)[1], dtype="int32")  # (S,)
            context = blocked_attention(
                q, k, kv[:, :, None], q_positions, k_positions, self.scale,
                block_size=self.block_size,
            )  # (B, T, H, R)  # fmt: skip
            return head_product(context, w_uv), cache  # (B, T, H, Dv)
        scores = ops.einsum("bthr,bsr->bths", q_latent, kv)  # (B, T, H, S)
        scores = scores + ops.einsum("bthd,bsd->bths", q_pe, pe)  # (B, T, H, S)
        scores = ops.cast(scores, "float32") * self.scale
        k_positions = ops.arange(ops.shape(kv)[1], dtype="int32")  # (S,)
        mask = visible(q_positions, k_positions)[:, :, None, :]  # (B|1, T, 1, S)
        scores = ops.where(mask, scores, NEG_INF)  # (B, T, H, S)
        probs = ops.cast(ops.softmax(scores, axis=-1), kv.dtype)  # (B, T, H, S)
        context = ops.einsum("bths,bsr->bthr", probs, kv)  # (B, T, H, R)
        return head_product(context, w_uv), cache  # (B, T, H, Dv)

    def absorbed_kernels(self):
        """`kv_b_proj`'s kernel split and laid out for the absorbed einsums: `(w_uk (H,
        Dn, R), w_uv (H, R, Dv))`, heads leading as XLA's batched products want them."""
        h, nope, rank = self.n_heads, self.qk_nope_head_dim, self.kv_lora_rank
        w = ops.cast(self.kv_b_proj.kernel, self.compute_dtype)  # (R, H*(Dn+Dv))
        if getattr(self.kv_b_proj, "kernel_out_in", False):  # `generation.decode_layout`
            w = ops.transpose(w)
        w = ops.reshape(w, (rank, h, nope + self.v_head_dim))  # (R, H, Dn+Dv)
        w_uk = ops.transpose(w[..., :nope], (1, 2, 0))  # (H, Dn, R)
        w_uv = ops.transpose(w[..., nope:], (1, 0, 2))  # (H, R, Dv)
        return w_uk, w_uv

    def prepare_decoding(self, dtype=None) -> None:
        """Keeps `absorbed_kernels()` in variables for the decode loops (which call this
        when they are made): computed inside every step, XLA's CPU backend slices and
        transposes `kv_b_proj` per token (15.6 ms against 0.65 ms per layer at
        DeepSeek-V2-Lite's head shapes). The copies are derived, never checkpointed;
        a loop made after the weights change sees the new ones. `dtype`: theirs (None:
        the compute dtype). A 16-bit model decoded under XLA (`generation.decode_layout`)
        keeps them in float32: XLA's CPU backend converts a 16-bit kernel to float32
        for every batched (per-head) product anyway, and multiplying each head alone
        (matrix-vector products it reads faster) stepped no faster and took ~6 s more to
        trace and compile (the 1.46B demonstration)."""
        if not self.absorb:
            return
        kernels = [ops.cast(k, dtype or self.compute_dtype) for k in self.absorbed_kernels()]
        held = self._absorbed_kernels
        if held.values is None or held.values[0].dtype != kernels[0].dtype:
            held.values = [tf.Variable(k, trainable=False) for k in kernels]
        else:
            for v, k in zip(held.values, kernels):
                v.assign(k)

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
