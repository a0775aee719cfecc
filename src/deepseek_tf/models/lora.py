"""LoRA: low-rank adapters on a frozen base model (`train.lora_rank`, `lora_targets`).

A targeted `Dense` projection gets Keras' own adapters (`Dense.enable_lora`: float32
`(in, r)` and `(r, out)` factors, the kernel read as `kernel + alpha / r * a @ b`);
routed experts get the same per expert (`DeepSeekMoE.enable_lora`). Every other
weight stops training, so the optimizer holds state for the adapters alone, and
the routers' balancing bias stops moving: the base, adapters aside, stays exactly
the checkpoint it was (a PEFT adapter applied to it computes what the run does).

Targets name what the model declares about itself (`projection_layers`):
`attention` (every attention projection), `ffn` (every feed-forward projection:
dense FFNs and shared experts), `shared_experts`, `experts` (the routed experts),
or one projection by name (`q_b_proj`, `kv_a_proj_with_mqa`, `o_proj`, ...).
MTP modules are not adapted (they train only with the base model).

Adapters are merged (`merge_lora`) by `convert --to-hf` and `export`, or written
on their own in PEFT's layout (`peft.save_peft_adapter`).
"""

from __future__ import annotations

import keras
import numpy as np

from deepseek_tf.errors import ConfigError
from deepseek_tf.layers.moe import DeepSeekMoE

ROUTED = "experts"


def lora_targets(model, targets) -> tuple[list[tuple[str, keras.layers.Dense]], list]:
    """`([(block-relative key, Dense)], [DeepSeekMoE])` the targets select, in model order.

    Raises:
        ConfigError: a target selects nothing in this model (the message lists what
            the model has).
    """
    dense, moes, known, used = [], [], set(), set()
    for i, block in enumerate(model.blocks):
        for key, _, layer in block.projection_layers():
            parts = key.split("/")
            known.update(parts)
            hit = [t for t in targets if t in parts]
            if hit and type(layer) is keras.layers.Dense:
                used.update(hit)
                dense.append((f"blocks.{i}/{key}", layer))
        ffn = getattr(block, "ffn", None)
        if isinstance(ffn, DeepSeekMoE):
            known.add(ROUTED)
            if ROUTED in targets:
                used.add(ROUTED)
                moes.append(ffn)
    for target in targets:
        if target not in used:
            raise ConfigError(
                f"train.lora_targets: {target!r} selects nothing in this model (it has: "
                f"{', '.join(sorted(known))})"
            )
    return dense, moes


def apply_lora(model, rank: int, alpha: float, targets) -> int:
    """Adds adapters to the targets of a built model and freezes everything else;
    returns the number of adapter parameters."""
    dense, moes = lora_targets(model, targets)
    for _, layer in dense:
        layer.enable_lora(rank, lora_alpha=alpha)
    for moe in moes:
        moe.enable_lora(rank, alpha)
    adapters = {id(v) for v in lora_variables(model)}
    for variable in model.weights:
        if id(variable) not in adapters:
            variable.trainable = False
    for moe in model.moe_modules():  # the routing bias is part of the frozen base too
        moe.bias_update_speed = 0.0
    return sum(int(v.numpy().size) for v in lora_variables(model))


def lora_variables(model) -> list:
    """The adapters' variables (everything `apply_lora` left trainable)."""
    return [v for v in model.weights if "lora_" in v.path.rsplit("/", 1)[-1]]


def describe_lora(model, rank: int, targets) -> str:
    """The trainer's log line: adapters' rank, targets and share of the parameters."""
    adapters = sum(int(np.prod(v.shape)) for v in lora_variables(model))
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    return (
        f"[lora] rank {rank} on {', '.join(targets)}: {adapters:,} trainable of {total:,} "
        f"parameters ({adapters / total:.2%})"
    )


def merge_lora(model) -> None:
    """Folds every adapter into its base weight (then zeroes it): the model computes the
    same, with the plain weights a Hugging Face checkpoint or an export carries."""
    for layer in model._flatten_layers(include_self=False):
        if type(layer) is keras.layers.Dense and layer.lora_enabled:
            merged = layer.kernel  # kernel + alpha / r * a @ b, in the compute dtype
            layer._kernel.assign(keras.ops.cast(merged, layer._kernel.dtype))
            layer.lora_kernel_b.assign(keras.ops.zeros_like(layer.lora_kernel_b))
        elif isinstance(layer, DeepSeekMoE) and layer.lora_rank:
            layer.merge_lora()
