"""Hugging Face DeepSeek-V2/V3 `config.json` <-> deepseek-tf `Config`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepseek_tf.config.loader import config_from_dict
from deepseek_tf.config.schema import Config, DataConfig
from deepseek_tf.convert.safetensors_io import DEFAULT_BLOCK
from deepseek_tf.errors import ConfigError
from deepseek_tf.layers.rotary import yarn_attention_factor
from deepseek_tf.models.builder import ffn_hidden_dim

HF_CONFIG_FILE = "config.json"
MODEL_TYPES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
)
REQUIRED_MOE = ("moe_intermediate_size", "num_experts_per_tok")
# transformers' class defaults for the fields a config.json may leave out.
HF_DEFAULTS = {
    "deepseek_v3": {
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "max_position_embeddings": 4096,
    },
    "deepseek_v2": {
        "n_shared_experts": 2,
        "routed_scaling_factor": 1.0,
        "n_group": None,
        "topk_group": None,
        "first_k_dense_replace": 0,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "topk_method": "greedy",
        "max_position_embeddings": 2048,
    },
}
COMMON_DEFAULTS = {
    "moe_layer_freq": 1,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "initializer_range": 0.02,
    "aux_loss_alpha": 0.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "rope_interleave": True,
}


def read_hf_config(directory: str | Path) -> dict:
    """The parsed `config.json` of a Hugging Face model directory."""
    path = Path(directory) / HF_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{directory}: no {HF_CONFIG_FILE} (is this a Hugging Face model?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{HF_CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{HF_CONFIG_FILE}: expected a JSON object, got {type(data).__name__}")
    return data


class _Fields:
    """Typed access to config.json fields with one-line errors naming the field."""

    def __init__(self, hf: Mapping[str, Any], defaults: Mapping[str, Any]):
        self.hf = hf
        self.defaults = defaults

    def get(self, key: str, kind: type, nullable: bool = False):
        value = self.hf.get(key, self.defaults.get(key))
        if value is None and (nullable or key not in self.defaults):
            return None
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{HF_CONFIG_FILE}: {key} must be {kind.__name__}, got {value!r}")
        return value


def _rope_settings(hf: Mapping[str, Any], max_positions: int) -> dict:
    """`rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4) -> our keys."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{HF_CONFIG_FILE}: rope_parameters must be an object, got {params!r}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind in ("default", None):
        return out
    if kind != "yarn":
        raise ConfigError(f"{HF_CONFIG_FILE}: rope type {kind!r} is not supported (default, yarn)")
    if params.get("truncate", True) is not True:
        raise ConfigError(f"{HF_CONFIG_FILE}: yarn truncate=false is not supported")
    original = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / original
    out.update(
        rope_scaling_factor=float(factor),
        rope_original_max_len=int(original),
        yarn_beta_fast=float(params.get("beta_fast") or 32.0),
        yarn_beta_slow=float(params.get("beta_slow") or 1.0),
        # transformers treats a missing mscale as "use mscale(factor)"; 0 does the same here.
        yarn_mscale=float(params.get("mscale") or 0.0),
        yarn_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
    )
    explicit = params.get("attention_factor")
    implied = yarn_attention_factor(factor, out["yarn_mscale"], out["yarn_mscale_all_dim"])
    if explicit is not None and abs(float(explicit) - implied) > 1e-6 * implied:
        raise ConfigError(
            f"{HF_CONFIG_FILE}: yarn attention_factor {explicit} differs from the {implied:.6g} "
            "its factor and mscales imply (not supported)"
        )
    return out


def config_from_hf(hf: Mapping[str, Any], precision: str = "float32") -> Config:
    """A deepseek-tf `Config` for a Hugging Face DeepSeek-V2/V3 `config.json` mapping.

    Fields a config.json may omit take transformers' defaults for its
    `model_type`; architecture-defining ones are required. The result uses
    MLA, interleaved rope, no embedding scaling and a BPE tokenizer, in
    `precision` (`"float32"` or `"bfloat16"`: both `train.precision` and `model.dtype`,
    the dtype the converted run is loaded in).
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"{HF_CONFIG_FILE}: model_type {model_type!r} is not a DeepSeek V2/V3 architecture"
        )
    for key in REQUIRED:
        if key not in hf:
            raise ConfigError(f"{HF_CONFIG_FILE}: missing required field {key!r}")
    f = _Fields(hf, {**COMMON_DEFAULTS, **HF_DEFAULTS[model_type]})
    n_experts = f.get("n_routed_experts", int, nullable=True) or 0
    if n_experts:
        for key in REQUIRED_MOE:
            if hf.get(key) is None:
                raise ConfigError(f"{HF_CONFIG_FILE}: missing required field {key!r}")
    if f.get("hidden_act", str) != "silu":
        raise ConfigError(f"{HF_CONFIG_FILE}: hidden_act {hf['hidden_act']!r} is not supported")
    if f.get("attention_bias", bool):
        raise ConfigError(f"{HF_CONFIG_FILE}: attention_bias true is not supported")
    if model_type == "deepseek_v3" and not f.get("rope_interleave", bool):
        raise ConfigError(f"{HF_CONFIG_FILE}: rope_interleave false is not supported")
    d_model, n_heads = f.get("hidden_size", int), f.get("num_attention_heads", int)
    nope, rope = f.get("qk_nope_head_dim", int), f.get("qk_rope_head_dim", int)
    max_positions = f.get("max_position_embeddings", int)
    vocab = f.get("vocab_size", int)
    mtp_key = "num_mtp_layers" if "num_mtp_layers" in hf else "num_nextn_predict_layers"
    model = {
        "vocab_size": vocab,
        "d_model": d_model,
        "n_layers": f.get("num_hidden_layers", int),
        "max_seq_len": max_positions,
        "tie_embeddings": f.get("tie_word_embeddings", bool),
        "scale_embeddings": False,
        "n_heads": n_heads,
        "position": "rope",
        "rope_layout": "interleaved",
        **_rope_settings(hf, max_positions),
        "ffn_dim": f.get("intermediate_size", int),
        "attention": "mla",
        "q_lora_rank": f.get("q_lora_rank", int, nullable=True) or 0,
        "kv_lora_rank": f.get("kv_lora_rank", int),
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": f.get("v_head_dim", int),
        "n_routed_experts": n_experts,
        "mtp_depth": f.get(mtp_key, int, nullable=True) or 0,
        "norm_eps": f.get("rms_norm_eps", float),
        "init_std": f.get("initializer_range", float),
    }
    if n_experts:
        model.update(
            n_shared_experts=f.get("n_shared_experts", int),
            num_experts_per_tok=f.get("num_experts_per_tok", int),
            moe_ffn_dim=f.get("moe_intermediate_size", int),
            first_k_dense_replace=f.get("first_k_dense_replace", int, nullable=True) or 0,
            moe_layer_freq=f.get("moe_layer_freq", int),
            scoring_func=f.get("scoring_func", str),
            topk_method=f.get("topk_method", str),
            n_group=f.get("n_group", int, nullable=True) or 1,
            topk_group=f.get("topk_group", int, nullable=True) or 1,
            norm_topk_prob=f.get("norm_topk_prob", bool),
            routed_scaling_factor=f.get("routed_scaling_factor", float),
            seq_aux_loss_alpha=f.get("aux_loss_alpha", float),
        )
        if model["topk_method"] != "noaux_tc":  # only the V3 router has a bias to update
            model["bias_update_speed"] = 0.0
    seq_len = min(DataConfig.seq_len, max_positions)
    data = {"tokenizer": "bpe", "vocab_size": vocab, "seq_len": seq_len}
    try:
        train = {"precision": precision}
        model = {**model, "dtype": precision}
        return config_from_dict({"model": model, "data": data, "train": train})
    except ConfigError as e:
        raise ConfigError(f"{HF_CONFIG_FILE}: {e}") from None


def fp8_block_size(hf: Mapping[str, Any]) -> tuple[int, int]:
    """`quantization_config.weight_block_size` (DeepSeek-V3 FP8), default 128 x 128."""
    quant = hf.get("quantization_config") or {}
    block = (quant.get("weight_block_size") if isinstance(quant, dict) else None) or DEFAULT_BLOCK
    if (
        not isinstance(block, (list, tuple))
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ConfigError(f"{HF_CONFIG_FILE}: quantization_config.weight_block_size {block!r}")
    return int(block[0]), int(block[1])


def _check_exportable(config: Config) -> None:
    """Raises `ConfigError` for models transformers' DeepSeek classes cannot express."""
    m, c = config.model, config.compression
    temperature = config.calibration.logit_temperature
    problems = {
        "model.attention": (m.attention != "mla", "only mla models have a DeepSeek equivalent"),
        "model.scale_embeddings": (m.scale_embeddings, "DeepSeek does not scale embeddings"),
        "model.blocks": (
            set(m.blocks) != {"attention"},
            "hybrid blocks have no DeepSeek equivalent",
        ),
        "model.share_adjacent": (
            m.share_adjacent != "none",
            "DeepSeek shares no weights across layers",
        ),
        "model.share_fraction": (m.share_fraction > 0, "DeepSeek shares no weights across layers"),
        "model.head": (m.head != "categorical", "transformers' DeepSeek has a plain output head"),
        "calibration.logit_temperature": (
            temperature != 1.0,
            "transformers' DeepSeek has no logit temperature (convert the uncalibrated run)",
        ),
        "model.rope_layout": (
            m.attention == "mla" and m.rope_layout != "interleaved",
            "exported DeepSeek configs use interleaved rope (rope_interleave: true)",
        ),
        "compression.quantize": (
            c.quantize != "none",
            "a Hugging Face checkpoint carries float weights; convert the float run",
        ),
    }
    if m.n_routed_experts:
        problems.update(
            {
                "model.moe_layer_freq": (
                    m.moe_layer_freq != 1,
                    "transformers makes every layer after first_k_dense_replace MoE",
                ),
                "model.n_shared_experts": (
                    m.n_shared_experts == 0,
                    "transformers needs shared experts",
                ),
                "model.topk_method": (
                    (m.scoring_func, m.topk_method)
                    in (("softmax", "noaux_tc"), ("sigmoid", "group_limited_greedy")),
                    f"{m.topk_method} with {m.scoring_func} scoring has no transformers equivalent",
                ),
                "model.norm_topk_prob": (
                    m.scoring_func == "softmax" and m.norm_topk_prob,
                    "transformers' DeepseekV2 (softmax routing) never renormalises",
                ),
            }
        )
    for key, (bad, why) in problems.items():
        if bad:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            raise ConfigError(f"{key}: {value!r} cannot be exported ({why})")


def hf_config_from(config: Config, vocab_size: int | None = None) -> dict:
    """The Hugging Face `config.json` mapping of `config` (inverse of `config_from_hf`).

    Sigmoid routing (or a dense model) becomes `deepseek_v3`, softmax routing
    `deepseek_v2`, which is what transformers implements for each.
    """
    m = config.model
    _check_exportable(config)
    v2 = bool(m.n_routed_experts) and m.scoring_func == "softmax"
    model_type = "deepseek_v2" if v2 else "deepseek_v3"
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling_factor > 1.0:
        rope.update(
            rope_type="yarn",
            factor=m.rope_scaling_factor,
            original_max_position_embeddings=m.rope_original_max_len,
            beta_fast=m.yarn_beta_fast,
            beta_slow=m.yarn_beta_slow,
        )
        if m.yarn_mscale:
            rope["mscale"] = m.yarn_mscale
        if m.yarn_mscale_all_dim:
            rope["mscale_all_dim"] = m.yarn_mscale_all_dim
    grouped = m.topk_method != "greedy"  # greedy ignores groups; transformers' V3 would not
    hf = {
        "architectures": [MODEL_TYPES[model_type]],
        "model_type": model_type,
        "vocab_size": vocab_size or m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": ffn_hidden_dim(m),
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "q_lora_rank": m.q_lora_rank or None,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "n_routed_experts": m.n_routed_experts,
        "n_shared_experts": m.n_shared_experts,
        "moe_intermediate_size": m.moe_ffn_dim,
        "num_experts_per_tok": m.num_experts_per_tok,
        "first_k_dense_replace": m.first_k_dense_replace if m.n_routed_experts else m.n_layers,
        "moe_layer_freq": m.moe_layer_freq,
        "scoring_func": m.scoring_func,
        "topk_method": m.topk_method,
        "n_group": m.n_group if grouped else 1,
        "topk_group": m.topk_group if grouped else 1,
        "norm_topk_prob": m.norm_topk_prob,
        "routed_scaling_factor": m.routed_scaling_factor,
        "aux_loss_alpha": m.seq_aux_loss_alpha,
        "num_nextn_predict_layers": m.mtp_depth,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if model_type == "deepseek_v3":
        hf["rope_interleave"] = True
    return hf
