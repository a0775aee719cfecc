"""One Multi-Token Prediction module (DeepSeek-V3, section 2.2)."""

from __future__ import annotations

import keras
from keras import ops

from deepseek_tf.layers.decoder_block import DecoderBlock
from deepseek_tf.layers.rms_norm import RMSNorm
from deepseek_tf.layers.serialization import init_config
from deepseek_tf.layers.structure import projection_layer


@keras.saving.register_keras_serializable(package="deepseek_tf")
class MTPModule(keras.layers.Layer):
    """Predicts the token one step further than the previous depth.

    `h_k = norm(Block(eh_proj([enorm(emb(t_{i+k})); hnorm(h_{k-1})])))`; the
    model's (shared) embedding and output head are applied by the caller. The
    embedding comes first in the concatenation, as in the published DeepSeek-V3
    checkpoints. `h_0` is the main model's final state *after* its final norm, and
    `h_k` (normed) feeds depth `k + 1`: the conventions of transformers' `MtpModel`
    and vLLM, so converted checkpoints predict what they were trained to.

    Args:
        d_model: residual width.
        block_config: keyword arguments of the module's `DecoderBlock`
            (without `d_model`).
        norm_eps: RMSNorm epsilon.
        init_std: std of the projection's normal initialiser.
        **kwargs: standard `keras.layers.Layer` arguments.

    Call arguments:
        hidden: `(B, T, d_model)` hidden states of the previous depth.
        next_embeddings: `(B, T, d_model)` embeddings of the tokens `k` ahead.
        cache: optional decoding cache of the module's block (see `init_cache`):
            speculative decoding drafts with it, one cached call per round.
        cache_index: int32 scalar position of `hidden[:, 0]`, with a cache.
        training: enables dropout.

    Returns:
        The block's output dict (`"x"` is normed: ready for the output head and
        the next depth; `"hidden"` is the un-normed block output). With a cache it
        adds `"cache"` (the updated cache) and `"block_input"` `(B, T, d_model)`
        (the block's input, from which a hybrid block's conv state is rewound).

    Examples:
    >>> mtp = MTPModule(16, {"block_type": "attention", "ffn_hidden_dim": 32,
    ...     "attention_config": {"n_heads": 2, "n_kv_heads": 2, "head_dim": 8}})
    >>> mtp(keras.ops.ones((1, 3, 16)), keras.ops.ones((1, 3, 16)))["x"].shape
    TensorShape([1, 3, 16])
    >>> cache = mtp.init_cache(batch_size=1, max_len=8)
    >>> h = keras.ops.ones((1, 2, 16))
    >>> out = mtp(h, h, cache=cache, cache_index=0)
    >>> out["x"].shape, out["cache"]["k"].shape
    (TensorShape([1, 2, 16]), TensorShape([1, 8, 2, 8]))
    """

    def __init__(
        self,
        d_model: int,
        block_config: dict,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.d_model = d_model
        self.block_config = dict(block_config)
        self.norm_eps = norm_eps
        self.init_std = init_std
        policy = self.dtype_policy
        self.enorm = RMSNorm(norm_eps, dtype=policy, name="enorm")
        self.hnorm = RMSNorm(norm_eps, dtype=policy, name="hnorm")
        self.eh_proj = projection_layer(d_model, init_std, policy, "eh_proj")
        self.block = DecoderBlock(d_model=d_model, dtype=policy, name="block", **self.block_config)
        self.norm = RMSNorm(norm_eps, dtype=policy, name="norm")

    def parameter_counts(self) -> tuple[int, int]:
        """`(total, activated)`: three norms, `eh_proj` `(2d, d)` and the block (the
        embedding and output head are the model's, shared)."""
        d = self.d_model
        fixed = 3 * d + 2 * d * d
        total, active = self.block.parameter_counts()
        return fixed + total, fixed + active

    def build(self, input_shape):
        self.enorm.build(input_shape)
        self.hnorm.build(input_shape)
        self.eh_proj.build((*input_shape[:-1], 2 * self.d_model))
        self.block.build(input_shape)
        self.norm.build(input_shape)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """The block's zeroed decoding cache for `max_len` positions."""
        return self.block.init_cache(batch_size, max_len)

    def call(self, hidden, next_embeddings, cache=None, cache_index=None, training=None):
        joined = ops.concatenate(
            [self.enorm(next_embeddings), self.hnorm(hidden)], axis=-1
        )  # (B, T, 2C)
        x = self.eh_proj(joined)  # (B, T, C)
        out = self.block(
            x, cache=cache, cache_index=cache_index, training=training, return_hidden=True
        )
        out = {**out, "hidden": out["x"], "x": self.norm(out["x"]), "ffn_hidden": out["hidden"]}
        if cache is not None:
            out["block_input"] = x
        return out

    def get_config(self):
        return {**super().get_config(), **init_config(self)}
