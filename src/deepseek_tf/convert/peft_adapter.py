"""LoRA adapters on their own, in PEFT's layout (`convert --to-hf RUN --adapter-only`).

PEFT stores a LoRA adapter as `adapter_config.json` (`peft_type: LORA`, `r`,
`lora_alpha`, `target_modules`, ...) and `adapter_model.safetensors` holding, per
adapted `Linear` named `M` in the base model, `base_model.model.M.lora_A.weight`
`(r, in)` and `base_model.model.M.lora_B.weight` `(out, r)`; the layer computes
`W x + lora_alpha / r * B A x`. Keras' `Dense.enable_lora` keeps `a` `(in, r)` and
`b` `(r, out)`, so PEFT's `A = a.T` and `B = b.T`. Routed experts are written per
expert (`...mlp.experts.{e}.gate_proj`), the layout of DeepSeek's checkpoints, where
each expert is its own `Linear`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deepseek_tf.convert.safetensors_writer import write_checkpoint
from deepseek_tf.convert.weight_map import EXPERTS, LINEAR, weight_entries
from deepseek_tf.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _module(name: str) -> str:
    return name[: -len(".weight")]  # "model.layers.0.self_attn.q_b_proj"


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """`{PEFT key: float32 array}` of every adapter in `model`."""
    tensors = {}
    for entry in weight_entries(model):
        if entry.layout == LINEAR and getattr(entry.owner, "lora_enabled", False):
            layer = entry.owner
            module = PREFIX + _module(entry.names[0])
            tensors[module + ".lora_A.weight"] = layer.lora_kernel_a.numpy().T  # (r, in)
            tensors[module + ".lora_B.weight"] = layer.lora_kernel_b.numpy().T  # (out, r)
        elif entry.layout == EXPERTS and entry.owner[0].lora_rank:
            moe, stack = entry.owner
            a = getattr(moe, f"{stack}_lora_a").numpy()  # (E, in, r)
            b = getattr(moe, f"{stack}_lora_b").numpy()  # (E, r, out)
            for e, name in enumerate(entry.names):
                module = PREFIX + _module(name)
                tensors[module + ".lora_A.weight"] = a[e].T  # (r, in)
                tensors[module + ".lora_B.weight"] = b[e].T  # (out, r)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def save_peft_adapter(model, config, out_dir, base_model: str | None = None) -> list[Path]:
    """Writes the run's adapters as a PEFT LoRA adapter directory; returns the files.

    Raises:
        ConfigError: the run has no adapters (`train.lora_rank` is 0).
    """
    t = config.train
    if not t.lora_rank:
        raise ConfigError("--adapter-only: the run has no LoRA adapters (train.lora_rank is 0)")
    tensors = adapter_tensors(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = sorted({k[len(PREFIX) :].split(".")[-3] for k in tensors})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": t.lora_rank,
        "lora_alpha": t.lora_alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": targets,
    }
    path = out_dir / ADAPTER_CONFIG
    path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    unsharded = sum(v.nbytes for v in tensors.values()) + 1
    return [path, *write_checkpoint(tensors, out_dir, unsharded, ADAPTER_WEIGHTS)]
