"""Pre-norm residual decoder block: attention (+ causal conv), then a dense or MoE FFN."""

from __future__ import annotations

from dataclasses import replace

import keras

from deepseek_tf.layers.attention import CausalSelfAttention
from deepseek_tf.layers.causal_conv import CausalConv1D
from deepseek_tf.layers.mla import MultiHeadLatentAttention
from deepseek_tf.layers.moe import DeepSeekMoE
from deepseek_tf.layers.rms_norm import RMSNorm
from deepseek_tf.layers.serialization import init_config
from deepseek_tf.layers.structure import Projection
from deepseek_tf.layers.swiglu import SwiGLU

BLOCK_TYPES = ("attention", "hybrid")
ATTENTION_TYPES = ("mha", "mla")


def make_attention(attention_type: str, d_model: int, config: dict, **kwargs):
    """`CausalSelfAttention` (mha) or `MultiHeadLatentAttention` (mla) from plain kwargs."""
    if attention_type == "mha":
        return CausalSelfAttention(d_model, **config, **kwargs)
    if attention_type == "mla":
        return MultiHeadLatentAttention(d_model, **config, **kwargs)
    raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DecoderBlock(keras.layers.Layer):
    """`x + mix(norm(x))`, then `x + ffn(norm(x))`.

    `block_type="attention"`: `mix` is causal self-attention (`attention_type`
    `"mha"`: multi-head/grouped-query; `"mla"`: multi-head latent attention).
    `block_type="hybrid"`: `mix = attention(h) + conv(h)`, the brief's
    HybridBlock made causal (see `CausalConv1D`), so local n-gram features and
    global attention are learned side by side.

    The feed-forward is a SwiGLU, or DeepSeekMoE when `moe_config` is given.

    Args:
        block_type: `"attention"` or `"hybrid"`.
        d_model: residual width.
        ffn_hidden_dim: SwiGLU hidden width (dense feed-forward).
        attention_config: keyword arguments of the attention layer (without
            `d_model`).
        attention_type: `"mha"` or `"mla"`.
        moe_config: keyword arguments of `DeepSeekMoE` (without `d_model`), or
            None for a dense SwiGLU.
        conv_kernel_size: hybrid blocks: width of the causal convolution.
        dropout: residual dropout rate.
        norm_eps: RMSNorm epsilon.
        init_std: std of input projections' initialiser.
        output_init_std: std of output projections' initialiser.
        projection_ranks: `{"attention/q_proj": rank, "ffn/up_proj": rank, ...}`:
            projections stored as two low-rank factors (`LowRankDense`).
        fake_quant: attention and feed-forward projections train against int8
            rounding (quantisation-aware training, see `FakeQuantDense`).
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        x: `(B, T, d_model)`.
        cache: optional per-layer cache `{"k", "v"[, "conv"]}` (see `init_cache`).
        cache_index: int32 scalar position of `x[:, 0]`, with a cache (or `(B,)` per
            row).
        training: enables dropout.
        return_hidden: also return the SwiGLU hidden activations.

    Returns:
        A dict with `"x"` `(B, T, d_model)`, plus `"cache"` when a cache was
        given and `"hidden"` when asked for; MoE blocks add `"aux_loss"` and
        `"expert_load"` (see `DeepSeekMoE`).

    Examples:
    >>> block = DecoderBlock("hybrid", 16, 32, {"n_heads": 4, "n_kv_heads": 4, "head_dim": 4})
    >>> block(keras.ops.ones((2, 5, 16)))["x"].shape
    TensorShape([2, 5, 16])
    """

    def __init__(
        self,
        block_type: str,
        d_model: int,
        ffn_hidden_dim: int,
        attention_config: dict,
        attention_type: str = "mha",
        moe_config: dict | None = None,
        conv_kernel_size: int = 3,
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        output_init_std: float = 0.02,
        projection_ranks: dict | None = None,
        fake_quant: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
        self.block_type = block_type
        self.d_model = d_model
        self.ffn_hidden_dim = ffn_hidden_dim
        self.attention_config = dict(attention_config)
        self.attention_type = attention_type
        self.moe_config = dict(moe_config) if moe_config else None
        self.conv_kernel_size = conv_kernel_size
        self.dropout = dropout
        self.norm_eps = norm_eps
        self.init_std = init_std
        self.output_init_std = output_init_std
        self.projection_ranks = dict(projection_ranks or {})
        self.fake_quant = fake_quant
        ranks = {"attention": {}, "ffn": {}}  # "ffn/up_proj" -> ranks["ffn"]["up_proj"]
        for key, rank in self.projection_ranks.items():
            sublayer, _, projection = key.partition("/")
            if sublayer not in ranks or not projection:
                raise ValueError(f"projection_ranks: unknown projection {key!r}")
            ranks[sublayer][projection] = rank
        if ranks["ffn"] and moe_config:
            raise ValueError("projection_ranks: MoE feed-forwards cannot be factorised")

        policy = self.dtype_policy
        self.attn_norm = RMSNorm(norm_eps, dtype=policy, name="attn_norm")
        self.attention = make_attention(
            attention_type,
            d_model,
            self.attention_config,
            init_std=init_std,
            output_init_std=output_init_std,
            projection_ranks=ranks["attention"],
            fake_quant=fake_quant,
            dtype=policy,
            name="attention",
        )
        self.conv = None
        if block_type == "hybrid":
            self.conv = CausalConv1D(d_model, conv_kernel_size, init_std, dtype=policy, name="conv")
        self.ffn_norm = RMSNorm(norm_eps, dtype=policy, name="ffn_norm")
        if self.moe_config:
            self.ffn = DeepSeekMoE(
                d_model,
                init_std=init_std,
                output_init_std=output_init_std,
                fake_quant=fake_quant,
                dtype=policy,
                name="moe",
                **self.moe_config,
            )
        else:
            self.ffn = SwiGLU(
                d_model,
                ffn_hidden_dim,
                init_std,
                output_init_std,
                projection_ranks=ranks["ffn"],
                fake_quant=fake_quant,
                dtype=policy,
                name="ffn",
            )
        self.drop = keras.layers.Dropout(dropout, dtype=policy)

    def parameter_counts(self, counted: set | None = None) -> tuple[int, int]:
        """`(total, activated)` parameters, from the constructor arguments alone.

        A sublayer or projection whose id is in `counted` (shared with an earlier block,
        see `models.sharing`) still runs, so it adds to `activated` but not to `total`;
        the ids of this block's attention and feed-forward and their projection layers
        are added to `counted`.
        """
        counted = set() if counted is None else counted
        norms = 2 * self.d_model  # attn_norm + ffn_norm
        total = active = norms
        if self.conv is not None:
            total, active = (c + n for c, n in zip(self.conv.parameter_counts(), (total, active)))
        for sublayer in (self.attention, self.ffn):
            sub_total, sub_active = sublayer.parameter_counts()
            active += sub_active
            if id(sublayer) in counted:
                continue
            total += sub_total
            counted.add(id(sublayer))
            for proj in getattr(sublayer, "projections", list)():
                layer = getattr(sublayer, proj.name, None)
                if id(layer) in counted:  # one of an earlier block's (`share_fraction`)
                    total -= proj.parameters()
                elif layer is not None:
                    counted.add(id(layer))
        return total, active

    def projection_layers(self) -> list[tuple[str, Projection, keras.layers.Layer]]:
        """`(key, declaration, layer)` of every projection in the block: keys are
        `"attention/<name>"`, `"ffn/<name>"` (the `projection_ranks` keys) and
        `"ffn/shared_experts/<name>"` (a MoE's shared experts: quantizable, but a MoE
        feed-forward is never factorised)."""
        out = [
            (f"attention/{p.name}", p, getattr(self.attention, p.name))
            for p in self.attention.projections()
        ]
        if isinstance(self.ffn, SwiGLU):
            out += [(f"ffn/{p.name}", p, getattr(self.ffn, p.name)) for p in self.ffn.projections()]
        elif self.ffn.shared_experts is not None:
            shared = self.ffn.shared_experts
            out += [
                (
                    f"ffn/shared_experts/{p.name}",
                    replace(p, factorizable=False),
                    getattr(shared, p.name),
                )
                for p in shared.projections()
            ]
        return out

    def prunable_units(self) -> list:
        """The attention's and the feed-forward's `PrunableUnits`."""
        return [*self.attention.prunable_units(), *self.ffn.prunable_units()]

    def build(self, input_shape):
        for layer in (self.attn_norm, self.attention, self.ffn_norm, self.ffn):
            if not layer.built:  # a sublayer shared with the previous block is built already
                layer.build(input_shape)
        if self.conv is not None:
            self.conv.build(input_shape)

    def cache_values_per_token(self) -> int:
        """Values the block's cache grows by per decoded token (the attention's; a hybrid
        block's conv state is a fixed window)."""
        return self.attention.cache_values_per_token()

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        cache = self.attention.init_cache(batch_size, max_len)
        if self.conv is not None:
            cache["conv"] = self.conv.init_state(batch_size)
        return cache

    def call(self, x, cache=None, cache_index=None, training=None, return_hidden=False,
             active=None):  # fmt: skip
        """`active`: optional `(B,)` bool rows whose tokens matter (`DeepSeekMoE.call`)."""
        h = self.attn_norm(x)
        new_cache = None
        if cache is None:
            mixed = self.attention(h)
        else:
            mixed, new_cache = self.attention(h, cache=cache, cache_index=cache_index)
        if self.conv is not None:
            if cache is None:
                mixed = mixed + self.conv(h)
            else:
                conv_out, conv_state = self.conv(h, state=cache["conv"])
                mixed = mixed + conv_out
                new_cache = {**new_cache, "conv": conv_state}
        x = x + self.drop(mixed, training=training)
        out = {}
        if self.moe_config:
            moe_out = self.ffn(
                self.ffn_norm(x), training=training, return_hidden=True, active=active
            )
            ffn_out, hidden = moe_out["x"], moe_out["hidden"]
            out.update(aux_loss=moe_out["aux_loss"], expert_load=moe_out["expert_load"])
        else:
            ffn_out, hidden = self.ffn(self.ffn_norm(x), return_hidden=True)
        x = x + self.drop(ffn_out, training=training)
        out["x"] = x
        if new_cache is not None:
            out["cache"] = new_cache
        if return_hidden:
            out["hidden"] = hidden
        return out

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
