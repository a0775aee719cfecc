"""A model's tensors as llama.cpp's deepseek2 GGUF files hold them (names and layouts)."""

from __future__ import annotations

import functools
import re

import numpy as np
import tensorflow as tf

from deepseek_tf.convert.weight_map import EXPERTS, LINEAR, weight_entries
from deepseek_tf.errors import DeepSeekTFError

# kept float32 at every `quant` (1-D tensors are too)
FLOAT32_TENSORS = re.compile(r"\.ffn_gate_inp\.weight$")


@functools.cache
def _name_map(n_layers: int):
    import gguf  # the optional [export] extra

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n_layers)


def gguf_name(hf_name: str, hf: dict) -> str:
    """The GGUF name of a Hugging Face tensor name (the `gguf` package's DeepSeek-2 map)."""
    name = _name_map(hf["num_hidden_layers"]).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise DeepSeekTFError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
    return name


def hf_tensors(model, hf: dict):
    """`(hf_name, array)` of the trunk's tensors in Hugging Face layout, one at a time:
    routed experts stacked `(E, out, in)` under `...mlp.experts.<proj>.weight`, MLA's
    `kv_b_proj` as `k_b_proj` `(H, kv_lora, nope)` and `v_b_proj` `(H, v, kv_lora)`;
    scaled embeddings as described in the module docstring."""
    n_layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    scale = np.sqrt(np.float32(hf["hidden_size"])) if model.scale_embeddings else None
    nope, v_dim = hf["qk_nope_head_dim"], hf["v_head_dim"]
    for entry in weight_entries(model):
        name = entry.names[0]
        found = re.match(r"model\.layers\.(\d+)\.", name)
        if found and int(found.group(1)) >= n_layers:
            continue  # an MTP module
        # the variable's buffer itself (`.numpy()` would copy it): read, never written
        value = np.asarray(tf.convert_to_tensor(entry.variable), dtype=np.float32)
        if entry.layout == EXPERTS:
            yield re.sub(r"\.experts\.0\.", ".experts.", name), value.transpose(0, 2, 1)
        elif entry.layout == LINEAR and name.endswith("kv_b_proj.weight"):
            kv_b = value.T.reshape(heads, nope + v_dim, -1)  # (H, nope + v, kv_lora)
            yield name.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].transpose(0, 2, 1)
            yield name.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:]
        elif entry.layout == LINEAR:
            yield name, value.T
        elif name == "model.embed_tokens.weight" and scale is not None:
            yield name, value * scale
            if model.lm_head is None:  # the tied head reads the unscaled matrix
                yield "lm_head.weight", value
        else:
            yield name.replace("e_score_correction_bias", "e_score_correction.bias"), value


def _qtype(name: str, shape: tuple[int, ...], quant: str):
    import gguf

    types = gguf.GGMLQuantizationType
    if quant == "f32" or len(shape) < 2 or FLOAT32_TENSORS.search(name):
        return types.F32
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
    if quant == "bf16" or shape[-1] % block:
        return types.BF16
    return types.Q8_0 if quant == "q8_0" else types.Q4_0


def encode(array: np.ndarray, qtype) -> np.ndarray:
    """`array` as the bytes (or float32 values) of GGUF type `qtype`."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def plan_tensors(model, hf: dict, quant: str) -> list[tuple[str, tuple, object]]:
    """`(gguf_name, shape, qtype)` of every tensor (one variable read at a time)."""
    plan = []
    for hf_name, array in hf_tensors(model, hf):  # arrays are views or small transposes
        name = gguf_name(hf_name, hf)
        plan.append((name, array.shape, _qtype(name, array.shape, quant)))
    return plan
