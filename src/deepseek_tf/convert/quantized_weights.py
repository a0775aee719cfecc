"""Converting a Hugging Face checkpoint straight into quantized weights
(`convert --from-hf DIR --quantize int8|int4`): the float checkpoint is never held whole.

The routed experts (nearly all of a DeepSeek model's weights) are built as codes from the
start (`expert_build_config`) and written a few experts at a time: each block of experts
is read, quantized by `layers/expert_quant.py` (what `DeepSeekMoE.quantize_experts` runs
on a float stack; every expert has its own scales, so a block quantizes as the whole
would) and its codes and scales written. The other projections -- attention, dense FFN,
shared experts and the untied output head -- are built in float with their initialisers
skipped (no page is touched until written), written, and at once quantized by Keras' own
`Dense.quantize`, which frees the float kernel. Peak memory is the quantized model plus
one projection's or one expert block's float weights and the float32 temporaries of
quantizing it -- for the largest, the output head, a few copies of it (the 15.7B
V2-Lite-sized moonshot: 8.1 GiB of int4 codes, 12.3 GiB peak; `benchmarks/moonshot.py`).
What stays float, as `compress
quantize` leaves it: the token embedding, norms, the router, MLA's `kv_b_proj` (absorbed
decoding folds it into the query and output) and MTP modules' own projections.

The run records `compression.quantize` (+ what it included and the group size) like a
`compress quantize` run, and loads the same way.
"""

from __future__ import annotations

import numpy as np

from deepseek_tf.compress.quantization import check_request, default_include
from deepseek_tf.config.loader import update_config
from deepseek_tf.convert.hf_weights import check_tensors, value_blocks, write_block, write_entry
from deepseek_tf.convert.safetensors_io import CheckpointReader
from deepseek_tf.convert.weight_map import shared_copies, weight_entries
from deepseek_tf.errors import ConfigError
from deepseek_tf.layers import expert_quant
from deepseek_tf.models.quantization import frozen_heap, quantization_config

MODES = ("int8", "int4")


def quantized_config(config, mode: str, group_size: int):
    """`config` with the `compression` section of a `mode` conversion: every projection
    (attention, dense FFN and shared experts, routed experts, an untied head).

    Raises:
        ConfigError: an unknown mode.
        CompressionError: a group size that does not divide the experts' input widths
            (named), or one that is neither -1 nor positive.
    """
    if mode not in MODES:
        raise ConfigError(f"--quantize: {mode!r} is not one of {', '.join(MODES)}")
    include = default_include(config.model, mode)
    if not config.model.tie_embeddings:
        include += ("head",)
    check_request(config, mode, include, bits=4, group_size=group_size)
    section = {"quantize": mode, "quantize_include": include, "quantize_group_size": group_size}
    return update_config(config, compression=section)


def expert_build_config(config):
    """The config to build the float model of a quantized conversion from: `config` (the
    quantized run's) with only its routed experts quantized, so that they are created as
    codes and no float stack is ever allocated."""
    c = config.compression
    include = ("experts",) if "experts" in c.quantize_include else ()
    section = {"quantize": c.quantize if include else "none", "quantize_include": include}
    return update_config(config, compression=section)


def assign_quantized_weights(model, reader: CheckpointReader, compression) -> tuple[int, list]:
    """Checks the checkpoint against `model` (built from `expert_build_config` with its
    initialisers skipped), then writes every variable: expert codes block by block, each
    projection of `compression.quantize_include` quantized right after its float weights
    are written.

    Returns:
        `(n_tensors, kept)`: the Hugging Face tensors read, and the variables written that
        are still the model's (the float projections' were replaced by codes and scales).

    Raises:
        ConversionError: a tensor is missing, mis-shaped or unexpected (named).
    """
    mode, group_size = compression.quantize, compression.quantize_group_size
    entries = weight_entries(model)
    check_tensors(reader, entries, set(shared_copies(model)))
    n_tensors = sum(len(e.names) for e in entries)
    dense = {id(layer) for layer in model.quantizable_layers(compression.quantize_include)}
    cfg = quantization_config(mode, compression.quantize_bits, group_size)
    kept = []
    entries.reverse()  # popped in model order: no list holds a written float variable
    with frozen_heap():
        while entries:
            entry = entries.pop()
            if entry.float_shape is not None:  # routed experts, built as codes
                kept += write_expert_codes(entry, reader, mode, group_size)
                continue
            write_entry(entry, reader)
            if id(entry.owner) in dense:  # a projection's `Dense`: its float kernel goes
                layer = entry.owner
                del entry
                layer.quantize(mode, config=cfg)
                del layer
            else:
                kept.append(entry.variable)
    return n_tensors, kept


def write_expert_codes(entry, reader: CheckpointReader, mode: str, group_size: int) -> list:
    """Writes an expert stack's codes and scales (`entry`: its quantized `weight_map`
    entry) from the float experts, a block of experts at a time; returns the two."""
    moe, stack = entry.owner
    codes, scale = getattr(moe, f"{stack}_codes"), getattr(moe, f"{stack}_scale")
    for begin, block in value_blocks(entry, reader, np.float32):  # (n, in, out)
        block_codes, block_scale = expert_quant.quantize(block, mode, group_size)
        del block
        write_block(codes, begin, block_codes)
        write_block(scale, begin, block_scale)
    return [codes, scale]
