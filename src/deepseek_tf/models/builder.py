"""Config -> model: the one place the config becomes layer keyword arguments."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import tensorflow as tf

from deepseek_tf.config.schema import CompressionConfig, Config, ModelConfig
from deepseek_tf.config.validation import parse_lowrank
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.causal_lm import CausalLM
from deepseek_tf.models.lora import apply_lora
from deepseek_tf.models.quantization import apply_quantized_structure


def ffn_hidden_dim(m: ModelConfig) -> int:
    """`model.ffn_dim`, or 8/3 * d_model rounded up to a multiple of 32."""
    if m.ffn_dim:
        return m.ffn_dim
    return int(math.ceil(8 * m.d_model / 3 / 32) * 32)


def head_dim(m: ModelConfig) -> int:
    return m.head_dim or m.d_model // m.n_heads


def attention_config(m: ModelConfig) -> dict:
    """Keyword arguments of the attention layer (mha or mla) of every block."""
    yarn = {
        "blocked_above": m.attention_blocked_above,
        "block_size": m.attention_block_size,
        "rope_theta": m.rope_theta,
        "rope_scaling_factor": m.rope_scaling_factor,
        "rope_original_max_len": m.rope_original_max_len,
        "yarn_beta_fast": m.yarn_beta_fast,
        "yarn_beta_slow": m.yarn_beta_slow,
        "yarn_mscale": m.yarn_mscale,
        "yarn_mscale_all_dim": m.yarn_mscale_all_dim,
    }
    if m.attention == "mla":
        return {
            "n_heads": m.n_heads,
            "q_lora_rank": m.q_lora_rank,
            "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim,
            "rope_layout": m.rope_layout,
            "norm_eps": 1e-6,  # DeepSeek's latent norms use 1e-6 whatever rms_norm_eps is
            "absorb": m.mla_absorb,
            **yarn,
        }
    return {
        "n_heads": m.n_heads,
        "n_kv_heads": m.n_kv_heads or m.n_heads,
        "head_dim": head_dim(m),
        "position": m.position,
        "rope_layout": m.rope_layout,
        "bias_buckets": m.bias_buckets,
        "bias_max_distance": m.bias_max_distance,
        **yarn,
    }


def moe_config(m: ModelConfig, c: CompressionConfig) -> dict | None:
    """Keyword arguments of `DeepSeekMoE` (routed experts stored as `c` says), or None for a
    dense model."""
    if not m.n_routed_experts:
        return None
    return {
        "moe_hidden_dim": m.moe_ffn_dim,
        "n_routed_experts": m.n_routed_experts,
        "n_shared_experts": m.n_shared_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "scoring_func": m.scoring_func,
        "topk_method": m.topk_method,
        "n_group": m.n_group,
        "topk_group": m.topk_group,
        "norm_topk_prob": m.norm_topk_prob,
        "routed_scaling_factor": m.routed_scaling_factor,
        "bias_update_speed": m.bias_update_speed,
        "seq_aux_loss_alpha": m.seq_aux_loss_alpha,
        "dispatch": m.moe_dispatch,
        # routed experts stored as int8/int4 codes (`compress quantize --include experts`)
        "expert_quantize": c.quantize if "experts" in c.quantize_include else "none",
        "expert_group_size": c.quantize_group_size,
    }


def moe_layers(m: ModelConfig) -> list[bool]:
    """Which layers use DeepSeekMoE (after `first_k_dense_replace`, every `moe_layer_freq`)."""
    return [
        bool(m.n_routed_experts) and i >= m.first_k_dense_replace and i % m.moe_layer_freq == 0
        for i in range(m.n_layers)
    ]


def layer_overrides(m: ModelConfig, c: CompressionConfig) -> list | None:
    """Per-layer shape changes of architecture `m` written by `deepseek-tf compress` (`c`),
    or None (uniform model)."""
    if not (c.layer_n_heads or c.layer_ffn_dims or c.layer_n_experts or c.lowrank):
        return None
    ranks = parse_lowrank(c.lowrank, m.n_layers)
    kv_group = m.n_heads // (m.n_kv_heads or m.n_heads) if m.attention == "mha" else 1
    out = []
    for i in range(m.n_layers):
        o = {}
        if c.layer_n_heads and c.layer_n_heads[i]:
            heads = c.layer_n_heads[i]  # whole kv groups (checked by config validation)
            o["attention"] = {"n_heads": heads}
            if m.attention == "mha":
                o["attention"]["n_kv_heads"] = heads // kv_group
        if c.layer_ffn_dims and c.layer_ffn_dims[i]:
            o["ffn_hidden_dim"] = c.layer_ffn_dims[i]
        if c.layer_n_experts and c.layer_n_experts[i]:
            o["moe"] = {"n_routed_experts": c.layer_n_experts[i]}
        if ranks[i]:
            o["projection_ranks"] = ranks[i]
        out.append(o)
    return out


def model_kwargs(config: Config, vocab_size: int | None = None) -> dict:
    """The plain keyword arguments `CausalLM` is built with: the architecture (`model`), as
    compressed (`compression`) and calibrated (`calibration`)."""
    m, c, d = config.model, config.compression, config.data
    vocab = vocab_size or m.vocab_size
    if not vocab:
        raise ConfigError("model.vocab_size: unknown (0) and no tokenizer to take it from")
    return {
        "vocab_size": vocab,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "max_seq_len": m.max_seq_len,
        "block_types": [m.blocks[i % len(m.blocks)] for i in range(m.n_layers)],
        "attention_config": attention_config(m),
        "ffn_hidden_dim": ffn_hidden_dim(m),
        "attention_type": m.attention,
        "moe_config": moe_config(m, c),
        "moe_layers": moe_layers(m),
        "mtp_depth": m.mtp_depth,
        "remat": m.remat,
        "share_adjacent": m.share_adjacent,
        "share_fraction": m.share_fraction,
        "conv_kernel_size": m.conv_kernel_size,
        "tie_embeddings": m.tie_embeddings,
        "scale_embeddings": m.scale_embeddings,
        "dropout": m.dropout,
        "embedding_noise_std": d.embedding_noise_std if d.embedding_noise else 0.0,
        "norm_eps": m.norm_eps,
        "init_std": m.init_std,
        "layer_overrides": layer_overrides(m, c),
        "fake_quant": c.fake_quant,
        "output_head": m.head,
        "head_samples": m.head_samples,
        "head_kl_weight": m.head_kl_weight,
        "logit_temperature": config.calibration.logit_temperature,
    }


def inference_dtype(config: Config) -> str:
    """The dtype policy a run is loaded in (eval, generate, serve, export): `model.dtype`,
    or (empty, every run before it existed) `train.precision`; `"auto"`: bfloat16 where
    the hardware multiplies it natively (`native_bfloat16`), else float32.

    Examples:

    >>> from deepseek_tf.config.schema import Config
    >>> inference_dtype(Config())
    'float32'
    """
    dtype = config.model.dtype or config.train.precision
    if dtype == "auto":
        return "bfloat16" if native_bfloat16() else "float32"
    return dtype


def native_bfloat16(cpu_flags: set[str] | None = None, accelerators: int | None = None) -> bool:
    """True where bfloat16 matrix products run natively: a GPU/TPU, or a CPU with
    AVX512-BF16 or AMX-BF16. Elsewhere XLA's CPU backend converts every bfloat16 weight
    to float32 (0.2-1.1 billion values/s here, against 3.5-7.3 for a float32 product of
    the same weights: `benchmarks/decode_kernels.py`), so float32 weights decode faster.
    Where it is native, TensorFlow's own (oneDNN) kernels multiply bfloat16, while XLA's
    CPU backend still works in float32 copies: decoding a model too large for the CPU's
    cache leaves XLA for it (`generation.memory_bound.xla_decode`).

    Args:
        cpu_flags: the CPU's feature flags (None: read from /proc/cpuinfo; none there:
            no native support assumed).
        accelerators: GPUs and TPUs present (None: asked of TensorFlow).
    """
    if accelerators is None:
        accelerators = sum(len(tf.config.list_physical_devices(k)) for k in ("GPU", "TPU"))
    if accelerators:
        return True
    if cpu_flags is None:
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
        except OSError:
            lines = []
        flags = next((line for line in lines if line.startswith("flags")), "flags :")
        cpu_flags = set(flags.split(":", 1)[1].split())
    return bool(cpu_flags & {"avx512_bf16", "amx_bf16"})


def unbuilt_model(
    config: Config, vocab_size: int | None = None, dtype: str | None = None
) -> CausalLM:
    """The `CausalLM` of `config` without weights: it describes itself
    (`parameter_counts`, `prunable_units`) at any size, 671B parameters included.
    `dtype`: its dtype policy (None: `train.precision`)."""
    policy = keras.DTypePolicy(dtype or config.train.precision)
    return CausalLM(**model_kwargs(config, vocab_size), dtype=policy)


def build_model(
    config: Config,
    vocab_size: int | None = None,
    seed: int | None = None,
    lora: bool = True,
    dtype: str | None = None,
) -> CausalLM:
    """Builds the `CausalLM` of `config`: weights initialised (seeded), for a quantized run
    (`compression.quantize`) the quantized variables its checkpoint holds, and with
    `train.lora_rank` (unless `lora` is False) the adapters, everything else frozen.

    Args:
        config: the run's config.
        vocab_size: None: `model.vocab_size`.
        seed: seeds Keras' random state before the weights are made (None: not seeded).
        lora: add `train.lora_rank` adapters.
        dtype: the variables' dtype policy; None: `train.precision` (training). A loaded
            run passes `inference_dtype(config)`.

    Returns:
        The built model.
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = unbuilt_model(config, vocab_size, dtype)
    model.build((None, None))
    if config.compression.quantize != "none":
        apply_quantized_structure(model, config.compression)
    t = config.train
    if lora and t.lora_rank:
        apply_lora(model, t.lora_rank, t.lora_alpha, t.lora_targets)
    return model


def parameter_count(config: Config, vocab_size: int | None = None) -> dict:
    """Parameter counts of `config`'s model from its layers' declarations, without
    allocating a weight (see `CausalLM.parameter_counts`)."""
    return unbuilt_model(config, vocab_size).parameter_counts()
