"""Tiny Hugging Face DeepSeek models for the conversion tests (torch + transformers, imported
by the functions that need them: `TINY` alone serves tests without them)."""

from __future__ import annotations

import numpy as np

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "max_position_embeddings": 64,
    "num_nextn_predict_layers": 0,
    "initializer_range": 0.1,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}


def hf_config(model_type: str = "deepseek_v3", **overrides):
    """A tiny `DeepseekV3Config` / `DeepseekV2Config` (eager attention)."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    values = {**TINY, **overrides}
    if model_type == "deepseek_v2":
        values.pop("num_nextn_predict_layers")
        values.setdefault("topk_method", "greedy")
        return DeepseekV2Config(**values)
    return DeepseekV3Config(**values)


def hf_model(config, seed: int = 0, bias_std: float = 0.05):
    """A randomly initialised causal LM in eval mode; V3 routers get a random correction bias."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * bias_std)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_ids(vocab_size: int, shape=(2, 12), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=shape).astype(np.int32)
