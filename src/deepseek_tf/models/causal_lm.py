"""The deepseek-tf causal language model."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from deepseek_tf.errors import InputError
from deepseek_tf.layers.decoder_block import DecoderBlock
from deepseek_tf.layers.rms_norm import RMSNorm
from deepseek_tf.layers.serialization import init_config


def check_token_ids(token_ids, vocab_size: int, max_seq_len: int) -> None:
    """Eager-only input check with a one-line error (graph inputs are not checked)."""
    ids = np.asarray(token_ids)
    if ids.ndim != 2:
        raise InputError(f"token ids must have shape (batch, seq), got {ids.shape}")
    if ids.shape[1] > max_seq_len:
        raise InputError(
            f"sequence of {ids.shape[1]} tokens exceeds the model's context of {max_seq_len}"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise InputError(f"token id {bad} is out of range [0, {vocab_size})")


@keras.saving.register_keras_serializable(package="deepseek_tf")
class CausalLM(keras.Model):
    """Decoder-only language model: embed, decoder blocks, RMSNorm, head.

    Args:
        vocab_size: number of token ids.
        d_model: residual width.
        n_layers: number of decoder blocks.
        max_seq_len: longest sequence (and KV cache) the model accepts.
        block_types: one entry per layer, `"attention"` or `"hybrid"`.
        attention_config: keyword arguments of `CausalSelfAttention` shared by
            every layer (heads, head size, position scheme, rope/yarn, bias).
        ffn_hidden_dim: SwiGLU hidden width.
        conv_kernel_size: causal conv width in hybrid blocks.
        tie_embeddings: use the embedding matrix as the output head.
        dropout: embedding and residual dropout.
        embedding_noise_std: std of Gaussian noise added to the (scaled)
            embeddings during training; 0 disables (the brief's augmentation).
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal initialisers; output projections use
            `init_std / sqrt(2 * n_layers)`.
        **kwargs: standard `keras.Model` arguments (`name`, `dtype`).

    Call arguments:
        token_ids: `(B, T)` int32.
        training: enables dropout and embedding noise.

    Returns:
        `(B, T, vocab_size)` float32 logits.

    Examples:
    >>> model = CausalLM(vocab_size=10, d_model=16, n_layers=1, max_seq_len=8,
    ...     block_types=["attention"],
    ...     attention_config={"n_heads": 2, "n_kv_heads": 2, "head_dim": 8},
    ...     ffn_hidden_dim=32)
    >>> model(np.zeros((1, 4), "int32")).shape
    TensorShape([1, 4, 10])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        max_seq_len: int,
        block_types: list,
        attention_config: dict,
        ffn_hidden_dim: int,
        conv_kernel_size: int = 3,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        embedding_noise_std: float = 0.0,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(block_types) != n_layers:
            raise ValueError(f"block_types has {len(block_types)} entries for {n_layers} layers")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.max_seq_len = max_seq_len
        self.block_types = list(block_types)
        self.attention_config = dict(attention_config)
        self.ffn_hidden_dim = ffn_hidden_dim
        self.conv_kernel_size = conv_kernel_size
        self.tie_embeddings = tie_embeddings
        self.dropout = dropout
        self.embedding_noise_std = embedding_noise_std
        self.norm_eps = norm_eps
        self.init_std = init_std

        policy = self.dtype_policy
        normal = keras.initializers.RandomNormal(stddev=init_std)
        self.embedding = keras.layers.Embedding(
            vocab_size, d_model, embeddings_initializer=normal, dtype=policy, name="embedding"
        )
        self.embedding_noise = keras.layers.GaussianNoise(
            embedding_noise_std, seed=0, dtype=policy, name="embedding_noise"
        )
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=policy)
        self.blocks = [
            DecoderBlock(
                block_type,
                d_model,
                ffn_hidden_dim,
                self.attention_config,
                conv_kernel_size=conv_kernel_size,
                dropout=dropout,
                norm_eps=norm_eps,
                init_std=init_std,
                output_init_std=init_std / math.sqrt(2 * n_layers),
                dtype=policy,
                name=f"block_{i}",
            )
            for i, block_type in enumerate(self.block_types)
        ]
        for i, block in enumerate(self.blocks):  # attributes, so tf.train.Checkpoint tracks them
            setattr(self, f"block_{i}", block)
        self.final_norm = RMSNorm(norm_eps, dtype=policy, name="final_norm")
        self.lm_head = None
        if not tie_embeddings:
            self.lm_head = keras.layers.Dense(
                vocab_size, use_bias=False, kernel_initializer=normal, dtype=policy, name="lm_head"
            )
        self.build((None, None))

    def build(self, input_shape):
        self.embedding.build(input_shape)
        hidden_shape = (*input_shape, self.d_model)
        for block in self.blocks:
            block.build(hidden_shape)
        self.final_norm.build(hidden_shape)
        if self.lm_head is not None:
            self.lm_head.build(hidden_shape)
        self.built = True

    # -- pieces shared by every forward path ------------------------------------------------
    def embed(self, token_ids, training=None):
        x = self.embedding(token_ids) * ops.cast(math.sqrt(self.d_model), self.compute_dtype)
        if self.embedding_noise_std > 0:
            x = self.embedding_noise(x, training=training)
        return self.embedding_dropout(x, training=training)  # (B, T, C)

    def head(self, x):
        x = self.final_norm(x)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:
            table = ops.cast(self.embedding.embeddings, x.dtype)  # (V, C)
            logits = ops.matmul(x, ops.transpose(table))  # (B, T, V)
        return ops.cast(logits, "float32")

    def __call__(self, token_ids, *args, **kwargs):
        if isinstance(token_ids, (list, tuple)):  # plain Python ids, e.g. [tokenizer.encode(s)]
            token_ids = np.asarray(token_ids, np.int32)
        return super().__call__(token_ids, *args, **kwargs)

    # -- forward paths --------------------------------------------------------------------
    def call(self, token_ids, training=None):
        if tf.executing_eagerly():
            check_token_ids(token_ids, self.vocab_size, self.max_seq_len)
        x = self.embed(token_ids, training)
        for block in self.blocks:
            x = block(x, training=training)["x"]
        return self.head(x)

    def forward_with_stats(self, token_ids, training=None, sparsity_threshold=1e-2):
        """Logits plus per-step statistics for the training monitor.

        Returns:
            `(logits, stats)`; `stats["activation_sparsity"]` is the fraction
            of SwiGLU hidden activations with magnitude below the threshold,
            averaged over layers.
        """
        x = self.embed(token_ids, training)
        sparsity = []
        for block in self.blocks:
            out = block(x, training=training, return_hidden=True)
            x = out["x"]
            small = ops.abs(ops.cast(out["hidden"], "float32")) < sparsity_threshold
            sparsity.append(ops.mean(ops.cast(small, "float32")))
        stats = {"activation_sparsity": ops.mean(ops.stack(sparsity))}
        return self.head(x), stats

    def init_cache(self, batch_size: int, max_len: int | None = None) -> list:
        """Zeroed per-layer decoding caches for `max_len` positions."""
        max_len = max_len or self.max_seq_len
        return [block.init_cache(batch_size, max_len) for block in self.blocks]

    def call_with_cache(self, token_ids, cache, cache_index):
        """Runs `token_ids` at positions `cache_index...`; returns `(logits, new_cache)`."""
        x = self.embed(token_ids, training=False)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            out = block(x, cache=layer_cache, cache_index=cache_index)
            x = out["x"]
            new_cache.append(out["cache"])
        return self.head(x), new_cache

    def get_config(self):
        return {**super().get_config(), **init_config(self)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
