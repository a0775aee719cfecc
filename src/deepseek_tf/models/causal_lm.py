"""The deepseek-tf causal language model."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from deepseek_tf.errors import InputError
from deepseek_tf.layers.decoder_block import DecoderBlock
from deepseek_tf.layers.gaussian_head import GaussianHead
from deepseek_tf.layers.mtp import MTPModule
from deepseek_tf.layers.relative_position_bias import RelativePositionBias
from deepseek_tf.layers.rms_norm import RMSNorm
from deepseek_tf.layers.serialization import init_config
from deepseek_tf.models import sharing
from deepseek_tf.models.model_structure import ModelStructure
from deepseek_tf.models.remat import run_block

HEADS = ("categorical", "gaussian")


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
class CausalLM(ModelStructure, keras.Model):
    """Decoder-only language model: embed, decoder blocks, RMSNorm, head.

    Args:
        vocab_size: number of token ids.
        d_model: residual width.
        n_layers: number of decoder blocks.
        max_seq_len: longest sequence (and KV cache) the model accepts.
        block_types: one entry per layer, `"attention"` or `"hybrid"`.
        attention_config: keyword arguments of the attention layer shared by
            every layer (heads, head sizes, position scheme, rope/yarn, ...).
        ffn_hidden_dim: SwiGLU hidden width of dense layers.
        attention_type: `"mha"` (multi-head/grouped-query) or `"mla"`
            (multi-head latent attention).
        moe_config: keyword arguments of `DeepSeekMoE`, or None.
        moe_layers: one flag per layer: MoE (True) or dense (False) FFN.
        mtp_depth: number of Multi-Token Prediction modules (training only).
        share_adjacent: `"ffn"`, `"attention"` or `"both"`: blocks `2i` and
            `2i + 1` use the same sublayer (weights shared, the brief's
            cross-layer sharing) when both blocks have the same kind of it;
            `"none"` shares nothing.
        share_fraction: share the first `round(f * n)` of each adjacent pair's `n`
            projection matrices (`models.sharing`; 0: none).
        remat: `"blocks"` recomputes each decoder block's activations during
            the backward pass (`tf.recompute_grad`) instead of keeping them:
            less memory for more compute; `"none"` keeps them.
        conv_kernel_size: causal conv width in hybrid blocks.
        tie_embeddings: use the embedding matrix as the output head.
        scale_embeddings: multiply token embeddings by `sqrt(d_model)`
            (DeepSeek checkpoints do not).
        dropout: embedding and residual dropout.
        embedding_noise_std: std of Gaussian noise added to the (scaled)
            embeddings during training; 0 disables (the brief's augmentation).
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal initialisers; output projections use
            `init_std / sqrt(2 * n_layers)`.
        layer_overrides: None, or one dict per layer changing that layer's
            shape (written by `deepseek-tf compress`): `"attention"` (attention
            kwargs, e.g. pruned `n_heads`), `"ffn_hidden_dim"`, `"moe"` (e.g.
            pruned `n_routed_experts`), `"projection_ranks"` (low-rank factors).
        fake_quant: projections train against int8 rounding (QAT).
        output_head: `"categorical"` (a softmax over the output projection) or
            `"gaussian"` (the brief's probabilistic head, `GaussianHead`: the
            output projection sees samples of a Gaussian over the final hidden
            state; deterministic paths use its mean).
        head_samples: gaussian head: latent samples per training step.
        head_kl_weight: gaussian head: weight of the KL to the prior, per token.
        logit_temperature: the next-token logits are divided by it (temperature
            scaling, fitted by `deepseek-tf calibrate`).
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
        attention_type: str = "mha",
        moe_config: dict | None = None,
        moe_layers: list | None = None,
        mtp_depth: int = 0,
        remat: str = "none",
        share_adjacent: str = "none",
        share_fraction: float = 0.0,
        conv_kernel_size: int = 3,
        tie_embeddings: bool = True,
        scale_embeddings: bool = True,
        dropout: float = 0.0,
        embedding_noise_std: float = 0.0,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        layer_overrides: list | None = None,
        fake_quant: bool = False,
        output_head: str = "categorical",
        head_samples: int = 1,
        head_kl_weight: float = 1e-3,
        logit_temperature: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(block_types) != n_layers:
            raise ValueError(f"block_types has {len(block_types)} entries for {n_layers} layers")
        moe_layers = list(moe_layers) if moe_layers else [False] * n_layers
        if len(moe_layers) != n_layers or (any(moe_layers) and not moe_config):
            raise ValueError("moe_layers needs one flag per layer, and moe_config when any is set")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.max_seq_len = max_seq_len
        self.block_types = list(block_types)
        self.attention_config = dict(attention_config)
        self.ffn_hidden_dim = ffn_hidden_dim
        self.attention_type = attention_type
        self.moe_config = dict(moe_config) if moe_config else None
        self.moe_layers = moe_layers
        self.mtp_depth = mtp_depth
        self.remat = remat
        self.share_adjacent = share_adjacent
        self.share_fraction = share_fraction
        self.conv_kernel_size = conv_kernel_size
        self.tie_embeddings = tie_embeddings
        self.scale_embeddings = scale_embeddings
        self.dropout = dropout
        self.embedding_noise_std = embedding_noise_std
        self.norm_eps = norm_eps
        self.init_std = init_std
        self.layer_overrides = [dict(o) for o in layer_overrides] if layer_overrides else None
        self.fake_quant = fake_quant
        self.output_head = output_head
        self.head_samples = head_samples
        self.head_kl_weight = head_kl_weight
        self.logit_temperature = logit_temperature
        if output_head not in HEADS:
            raise ValueError(f"output_head must be one of {HEADS}, got {output_head!r}")
        if self.layer_overrides and len(self.layer_overrides) != n_layers:
            raise ValueError(f"layer_overrides needs one entry per layer ({n_layers})")

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
            DecoderBlock(d_model=d_model, dtype=policy, name=f"block_{i}", **self._block_config(i))
            for i in range(n_layers)
        ]
        sharing.share_adjacent(self.blocks, share_adjacent, share_fraction)
        for i, block in enumerate(self.blocks):  # attributes, so tf.train.Checkpoint tracks them
            setattr(self, f"block_{i}", block)
        mtp_block = self._block_config(n_layers - 1, overrides=False)  # unpruned shapes
        self.mtp_modules = [
            MTPModule(d_model, mtp_block, norm_eps, init_std, dtype=policy, name=f"mtp_{k}")
            for k in range(mtp_depth)
        ]
        for k, module in enumerate(self.mtp_modules):
            setattr(self, f"mtp_{k}", module)
        self.final_norm = RMSNorm(norm_eps, dtype=policy, name="final_norm")
        self.gaussian_head = None
        if output_head == "gaussian":
            self.gaussian_head = GaussianHead(d_model, dtype=policy, name="gaussian_head")
        self.lm_head = None
        if not tie_embeddings:
            self.lm_head = keras.layers.Dense(
                vocab_size, use_bias=False, kernel_initializer=normal, dtype=policy, name="lm_head"
            )
        # Weights are allocated by `build` (`models.builder.build_model` calls it); an
        # unbuilt model still describes itself (`parameter_counts`, `prunable_units`).

    def _block_config(self, i: int, overrides: bool = True) -> dict:
        """Block `i`'s kwargs: the shared ones, with `layer_overrides[i]` (pruned widths,
        low-rank projections) applied; MTP modules take the unmodified shape."""
        o = self.layer_overrides[i] if overrides and self.layer_overrides else {}
        moe = self.moe_config if self.moe_layers[i] else None
        return {
            "block_type": self.block_types[i],
            "ffn_hidden_dim": o.get("ffn_hidden_dim", self.ffn_hidden_dim),
            "attention_config": {**self.attention_config, **o.get("attention", {})},
            "attention_type": self.attention_type,
            "moe_config": {**moe, **o.get("moe", {})} if moe else None,
            "conv_kernel_size": self.conv_kernel_size,
            "dropout": self.dropout,
            "norm_eps": self.norm_eps,
            "init_std": self.init_std,
            "output_init_std": self.init_std / math.sqrt(2 * self.n_layers),
            "projection_ranks": o.get("projection_ranks", {}),
            "fake_quant": self.fake_quant,
        }

    def build(self, input_shape):
        self.embedding.build(input_shape)
        hidden_shape = (*input_shape, self.d_model)
        for layer in (*self.blocks, *self.mtp_modules, self.final_norm):
            layer.build(hidden_shape)
        if self.gaussian_head is not None:
            self.gaussian_head.build(hidden_shape)
        if self.lm_head is not None:
            self.lm_head.build(hidden_shape)
        self.built = True

    # -- pieces shared by every forward path ------------------------------------------------
    def embed(self, token_ids, training=None):
        x = self.embedding(token_ids)
        if self.scale_embeddings:
            x = x * ops.cast(math.sqrt(self.d_model), self.compute_dtype)
        if self.embedding_noise_std > 0:
            x = self.embedding_noise(x, training=training)
        return self.embedding_dropout(x, training=training)  # (B, T, C)

    def project(self, x):
        """Output head on normed hidden states: `(B, T, C)` -> float32 `(B, T, V)`."""
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:
            table = ops.cast(self.embedding.embeddings, x.dtype)  # (V, C)
            logits = ops.matmul(x, ops.transpose(table))  # (B, T, V)
        return ops.cast(logits, "float32")

    def head(self, x):
        """Next-token logits of hidden states `(B, T, C)` (a gaussian head: its mean)."""
        normed = self.final_norm(x)
        if self.gaussian_head is not None:
            loc, _ = self.gaussian_head(normed)
            normed = ops.cast(loc, self.compute_dtype)
        return self.project(normed) / self.logit_temperature

    def sample_logits(self, x, samples: int, seed=None):
        """`(S, B, T, V)` next-token logits of `samples` draws of a gaussian head over hidden
        states `x` (`(1, B, T, V)`, the deterministic logits, for a categorical head),
        and the head's KL to its prior per position `(B, T)` (zeros when categorical)."""
        if self.gaussian_head is None:
            logits = self.head(x)
            return logits[None], ops.zeros(ops.shape(logits)[:2], "float32")
        loc, log_var = self.gaussian_head(self.final_norm(x))
        z = self.gaussian_head.sample(loc, log_var, samples, seed)  # (S, B, T, C)
        logits = self.project(ops.cast(z, self.compute_dtype)) / self.logit_temperature
        return logits, self.gaussian_head.kl_to_prior(loc, log_var)

    def moe_modules(self) -> list:
        """The DeepSeekMoE layers, in the order `forward_with_stats` reports their load."""
        blocks = [b for b, is_moe in zip(self.blocks, self.moe_layers) if is_moe]
        if self.moe_config and self.moe_layers[-1]:
            blocks += [m.block for m in self.mtp_modules]
        return [b.ffn for b in blocks]

    def weight_roles(self) -> dict[str, list]:
        """The weights that are not hidden-layer matrices though 2-D, by role (the optimizer
        decides by rank and by these, `training.optim`): `"tables"`, looked up by index (the
        token embedding, relative-position biases), and `"output_head"` (an untied head)."""
        biases = [x for x in self._flatten_layers() if isinstance(x, RelativePositionBias)]
        tables = [w for layer in (self.embedding, *biases) for w in layer.weights]
        head = list(self.lm_head.weights) if self.lm_head is not None else []
        return {"tables": tables, "output_head": head}

    def __call__(self, token_ids, *args, **kwargs):
        if isinstance(token_ids, (list, tuple)):  # plain Python ids, e.g. [tokenizer.encode(s)]
            token_ids = np.asarray(token_ids, np.int32)
        return super().__call__(token_ids, *args, **kwargs)

    # -- forward paths --------------------------------------------------------------------
    def call(self, token_ids, training=None):
        return self.head(self.hidden_states(token_ids, training))

    def hidden_states(self, token_ids, training=None):
        """The last block's output `(B, T, C)` (before the final norm and the head)."""
        if tf.executing_eagerly():
            check_token_ids(token_ids, self.vocab_size, self.max_seq_len)
        x = self.embed(token_ids, training)
        for block in self.blocks:
            x = block(x, training=training)["x"]
        return x

    def forward_with_stats(self, token_ids, training=None, sparsity_threshold=1e-2):
        """Logits plus what training needs beyond them.

        Returns:
            `(logits, stats)`: `stats["activation_sparsity"]` is the fraction
            of feed-forward hidden activations with magnitude below the
            threshold (mean over layers); `stats["aux_loss"]` the sum of the
            MoE balance losses; `stats["expert_load"]` `(n_moe_layers, E)` the
            routed-token fractions (MoE models only); `stats["mtp_logits"]` a
            list of `(B, T - k, V)` logits of MTP depth `k` predicting the token
            `k + 1` steps after each input position (its targets are the
            next-token targets shifted by `k`). A gaussian head adds
            `stats["sample_logits"]` `(S, B, T, V)` (its samples' logits) and
            `stats["head_kl"]` `(B, T)` (the weighted KL to its prior).
        """
        collected = {"sparsity": [], "aux_loss": [], "expert_load": []}

        def collect(out):
            small = ops.abs(ops.cast(out["hidden"], "float32")) < sparsity_threshold
            collected["sparsity"].append(ops.mean(ops.cast(small, "float32")))
            if "aux_loss" in out:
                collected["aux_loss"].append(out["aux_loss"])
                collected["expert_load"].append(out["expert_load"])

        embeddings = self.embed(token_ids, training)
        x = embeddings
        for block in self.blocks:
            out = run_block(block, x, training, remat=self.remat)
            collect(out)
            x = out["x"]
        logits = self.head(x)
        head_stats = {}
        if self.gaussian_head is not None:  # the ELBO: token loss over samples + KL
            sampled, kl = self.sample_logits(x, self.head_samples)  # (S, B, T, V), (B, T)
            head_stats = {"sample_logits": sampled, "head_kl": self.head_kl_weight * kl}
        mtp_logits = []
        # Depth 1 reads the main model's *normed* final state, and each depth hands its
        # normed output to the next -- as transformers' MtpModel and vLLM do.
        h = self.final_norm(x) if self.mtp_modules else x
        for k, module in enumerate(self.mtp_modules, start=1):
            out = module(h[:, :-1], embeddings[:, k:], training=training)  # (B, T - k, C)
            collect({**out, "hidden": out["ffn_hidden"]})
            h = out["x"]
            mtp_logits.append(self.project(out["x"]))
        stats = {
            "activation_sparsity": ops.mean(ops.stack(collected["sparsity"])),
            "aux_loss": ops.sum(ops.stack(collected["aux_loss"]))
            if collected["aux_loss"]
            else ops.zeros((), "float32"),
            "mtp_logits": mtp_logits,
            **head_stats,
        }
        if collected["expert_load"]:
            stats["expert_load"] = ops.stack(collected["expert_load"])  # (L_moe, E)
        return logits, stats

    def init_cache(self, batch_size: int, max_len: int | None = None) -> list:
        """Zeroed per-layer decoding caches for `max_len` positions (an int or a scalar
        tensor; None: the whole context)."""
        max_len = self.max_seq_len if max_len is None else max_len
        return [block.init_cache(batch_size, max_len) for block in self.blocks]

    def call_with_cache(self, token_ids, cache, cache_index, return_hidden=False, logits_at=None,
                        active=None):  # fmt: skip
        """Runs `token_ids` at positions `cache_index...`; returns `(logits, new_cache)`, or
        with `return_hidden` `(logits, new_cache, extras)`: `extras["hidden"]` the final
        state after the final norm `(B, T, C)` (what MTP depth 1 reads), `"block_inputs"`
        each block's input `(B, T, C)` (see `generation.speculative`).

        `logits` are `(B, T, V)`, or with `logits_at` (a scalar index into `T`, or `(B,)`:
        one per row) that position's `(B, 1, V)`: a prompt's prefill needs only its last
        position, and the head over every position was the largest product of a long
        prefill (T x V). `active`: optional `(B,)` bool, the rows whose tokens matter (MoE
        layers route only theirs: `DeepSeekMoE.call`)."""
        x = self.embed(token_ids, training=False)
        new_cache, inputs = [], []
        for block, layer_cache in zip(self.blocks, cache):
            inputs.append(x)
            out = block(x, cache=layer_cache, cache_index=cache_index, active=active)
            x = out["x"]
            new_cache.append(out["cache"])
        at = x if logits_at is None else _positions(x, logits_at)  # (B, T or 1, C)
        if not return_hidden:
            return self.head(at), new_cache
        extras = {"hidden": self.final_norm(x), "block_inputs": inputs}
        return self.head(at), new_cache, extras

    def get_config(self):
        return {**super().get_config(), **init_config(self)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _positions(x, at):
    """`x` `(B, T, C)` at position `at` (a scalar, or `(B,)`: one per row) -> `(B, 1, C)`."""
    rows = tf.broadcast_to(tf.reshape(at, (-1,)), tf.shape(x)[:1])  # (B,)
    return tf.gather(x, rows[:, None], axis=1, batch_dims=1)
