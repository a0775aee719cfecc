"""Which Hugging Face DeepSeek tensor feeds which variable of a `CausalLM`, and how.

Keras `Dense` kernels are `(in, out)`, the transpose of torch `Linear.weight`
`(out, in)`; routed experts are one stacked `(E, ...)` variable per projection
here and one tensor per expert in Hugging Face checkpoints. The MTP module `k`
is stored as decoder layer `num_hidden_layers + k`, as DeepSeek-V3 publishes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COPY = "copy"  # same layout (norm scales, embeddings, router bias)
LINEAR = "linear"  # torch (out, in) <-> keras (in, out)
EXPERTS = "experts"  # E torch (out, in) tensors <-> one keras (E, in, out)
# Tensors of published checkpoints that carry nothing this model needs.
IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Entry:
    """One model variable and the Hugging Face tensor(s) it corresponds to.

    Attributes:
        variable: the Keras variable.
        names: its Hugging Face tensor names (one per expert for `EXPERTS`).
        layout: `COPY`, `LINEAR` or `EXPERTS`.
        owner: the `Dense` layer of a `LINEAR` projection, or `(DeepSeekMoE, stack
            name)` of an `EXPERTS` entry (LoRA adapters are found through it).
        float_shape: for routed experts stored as int8/int4 codes (`variable` is then
            the codes, `expert_quant`'s layout), the float `(E, in, out)` stack's shape.
    """

    variable: object
    names: tuple[str, ...]
    layout: str
    owner: object = None
    float_shape: tuple[int, ...] | None = None  # quantized experts: the float stack's

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of each Hugging Face tensor."""
        shape = self.float_shape or tuple(int(d) for d in self.variable.shape)
        if self.layout == LINEAR:
            return shape[::-1]
        if self.layout == EXPERTS:
            return shape[1:][::-1]
        return shape

    def to_keras(self, tensors: list[np.ndarray]) -> np.ndarray:
        """The variable's value from its Hugging Face tensors (in `names` order)."""
        if self.layout == LINEAR:
            return tensors[0].T
        if self.layout == EXPERTS:
            return np.stack([t.T for t in tensors])
        return tensors[0]

    def to_hf(self, value: np.ndarray) -> dict[str, np.ndarray]:
        """The Hugging Face tensors of the variable's `value`."""
        if self.layout == LINEAR:
            return {self.names[0]: value.T}
        if self.layout == EXPERTS:
            return {name: value[e].T for e, name in enumerate(self.names)}
        return {self.names[0]: value}


def _attention(attn, prefix: str) -> list[Entry]:
    p = f"{prefix}self_attn."
    entries = []
    if attn.q_lora_rank > 0:
        entries += [
            _linear(attn.q_a_proj, f"{p}q_a_proj.weight"),
            Entry(attn.q_a_layernorm.scale, (f"{p}q_a_layernorm.weight",), COPY),
            _linear(attn.q_b_proj, f"{p}q_b_proj.weight"),
        ]
    else:
        entries.append(_linear(attn.q_proj, f"{p}q_proj.weight"))
    return entries + [
        _linear(attn.kv_a_proj_with_mqa, f"{p}kv_a_proj_with_mqa.weight"),
        Entry(attn.kv_a_layernorm.scale, (f"{p}kv_a_layernorm.weight",), COPY),
        _linear(attn.kv_b_proj, f"{p}kv_b_proj.weight"),
        _linear(attn.o_proj, f"{p}o_proj.weight"),
    ]


def _linear(layer, name: str) -> Entry:
    """A `Dense` projection (its kernel includes any LoRA adapters)."""
    return Entry(layer.kernel, (name,), LINEAR, layer)


def _swiglu(ffn, prefix: str) -> list[Entry]:
    return [
        _linear(getattr(ffn, proj), f"{prefix}{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]


def _moe(moe, prefix: str) -> list[Entry]:
    p = f"{prefix}mlp."
    experts = range(moe.n_routed_experts)
    entries = [Entry(moe.gate.kernel, (f"{p}gate.weight",), LINEAR)]
    if moe.scoring_func == "sigmoid":  # the V3 router; transformers' V3 always has the bias
        bias = moe.gate.e_score_correction_bias
        entries.append(Entry(bias, (f"{p}gate.e_score_correction_bias",), COPY))
    shapes = moe.expert_shapes()
    for proj, stack in (
        ("gate_proj", "experts_gate"),
        ("up_proj", "experts_up"),
        ("down_proj", "experts_down"),
    ):
        names = tuple(f"{p}experts.{e}.{proj}.weight" for e in experts)
        if moe.expert_quantize != "none":  # the codes; their scales follow from them
            codes = getattr(moe, f"{stack}_codes")
            entries.append(Entry(codes, names, EXPERTS, (moe, stack), tuple(shapes[stack])))
        else:
            entries.append(Entry(getattr(moe, stack), names, EXPERTS, (moe, stack)))
    if moe.shared_experts is not None:
        entries += _swiglu(moe.shared_experts, f"{p}shared_experts.")
    return entries


def _block(block, prefix: str) -> list[Entry]:
    entries = [Entry(block.attn_norm.scale, (f"{prefix}input_layernorm.weight",), COPY)]
    entries += _attention(block.attention, prefix)
    entries.append(Entry(block.ffn_norm.scale, (f"{prefix}post_attention_layernorm.weight",), COPY))
    if block.moe_config:
        entries += _moe(block.ffn, prefix)
    else:
        entries += _swiglu(block.ffn, f"{prefix}mlp.")
    return entries


def mtp_prefix(n_layers: int, k: int) -> str:
    """Hugging Face name prefix of MTP module `k`: decoder layer `n_layers + k`."""
    return f"model.layers.{n_layers + k}."


def weight_entries(model) -> list[Entry]:
    """Every variable of `model` (a DeepSeek-shaped `CausalLM`) with its Hugging Face names."""
    entries = [Entry(model.embedding.embeddings, ("model.embed_tokens.weight",), COPY)]
    for i, block in enumerate(model.blocks):
        entries += _block(block, f"model.layers.{i}.")
    entries.append(Entry(model.final_norm.scale, ("model.norm.weight",), COPY))
    if model.lm_head is not None:
        entries.append(_linear(model.lm_head, "lm_head.weight"))
    for k, module in enumerate(model.mtp_modules):
        p = mtp_prefix(model.n_layers, k)
        entries += [
            Entry(module.enorm.scale, (f"{p}enorm.weight",), COPY),
            Entry(module.hnorm.scale, (f"{p}hnorm.weight",), COPY),
            _linear(module.eh_proj, f"{p}eh_proj.weight"),
            *_block(module.block, p),
            Entry(module.norm.scale, (f"{p}shared_head.norm.weight",), COPY),
        ]
    return entries


def shared_copies(model) -> dict[str, str]:
    """Tensors published checkpoints repeat: name -> the name they copy.

    The MTP modules share the model's embedding and output head (DeepSeek-V3,
    section 2.2); checkpoints store them again as `embed_tokens` and
    `shared_head.head` of each MTP layer, and a tied head as `lm_head.weight`.
    """
    head = "model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight"
    copies = {}
    if model.lm_head is None:
        copies["lm_head.weight"] = head
    for k in range(len(model.mtp_modules)):
        p = mtp_prefix(model.n_layers, k)
        copies[f"{p}embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[f"{p}shared_head.head.weight"] = head
    return copies
