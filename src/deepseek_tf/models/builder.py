"""Config -> model, and parameter counts computed from the config alone."""

from __future__ import annotations

import math

import keras

from deepseek_tf.config.schema import Config, ModelConfig
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.causal_lm import CausalLM


def ffn_hidden_dim(m: ModelConfig) -> int:
    """`model.ffn_dim`, or 8/3 * d_model rounded up to a multiple of 32."""
    if m.ffn_dim:
        return m.ffn_dim
    return int(math.ceil(8 * m.d_model / 3 / 32) * 32)


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.n_heads


def model_kwargs(config: Config, vocab_size: int | None = None) -> dict:
    """The plain keyword arguments `CausalLM` is built with."""
    m = config.model
    vocab = vocab_size or m.vocab_size
    if not vocab:
        raise ConfigError("model.vocab_size: unknown (0) and no tokenizer to take it from")
    attention_config = {
        "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads or m.n_heads,
        "head_dim": head_dim(m),
        "position": m.position,
        "rope_theta": m.rope_theta,
        "rope_layout": m.rope_layout,
        "rope_scaling_factor": m.rope_scaling_factor,
        "rope_original_max_len": m.rope_original_max_len,
        "yarn_beta_fast": m.yarn_beta_fast,
        "yarn_beta_slow": m.yarn_beta_slow,
        "yarn_mscale": m.yarn_mscale,
        "yarn_mscale_all_dim": m.yarn_mscale_all_dim,
        "bias_buckets": m.bias_buckets,
        "bias_max_distance": m.bias_max_distance,
    }
    return {
        "vocab_size": vocab,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "max_seq_len": m.max_seq_len,
        "block_types": [m.blocks[i % len(m.blocks)] for i in range(m.n_layers)],
        "attention_config": attention_config,
        "ffn_hidden_dim": ffn_hidden_dim(m),
        "conv_kernel_size": m.conv_kernel_size,
        "tie_embeddings": m.tie_embeddings,
        "dropout": m.dropout,
        "embedding_noise_std": config.data.embedding_noise_std
        if config.data.embedding_noise
        else 0.0,
        "norm_eps": m.norm_eps,
        "init_std": m.init_std,
    }


def build_model(config: Config, vocab_size: int | None = None, seed: int | None = None) -> CausalLM:
    """Builds the `CausalLM` of `config` (weights initialised, policy from `train.precision`)."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    dtype = keras.DTypePolicy(config.train.precision)
    return CausalLM(**model_kwargs(config, vocab_size), dtype=dtype)


def parameter_count(config: Config, vocab_size: int | None = None) -> dict:
    """Parameter counts from the config, without allocating any weight."""
    kw = model_kwargs(config, vocab_size)
    d, v, att = kw["d_model"], kw["vocab_size"], kw["attention_config"]
    h, hkv, hd = att["n_heads"], att["n_kv_heads"], att["head_dim"]
    attention = d * h * hd + 2 * d * hkv * hd + h * hd * d
    if "dynamic" in att["position"]:
        attention += att["bias_buckets"] * h
    ffn = 3 * d * kw["ffn_hidden_dim"]
    conv = kw["conv_kernel_size"] * d * d + d
    blocks = sum(
        attention + ffn + 2 * d + (conv if t == "hybrid" else 0) for t in kw["block_types"]
    )
    embedding = v * d
    head = 0 if kw["tie_embeddings"] else v * d
    total = embedding + blocks + d + head
    return {
        "total": total,
        "embedding": embedding,
        "blocks": blocks,
        "head": head,
        "non_embedding": total - embedding,
    }
