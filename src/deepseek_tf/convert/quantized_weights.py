"""Converting a Hugging Face checkpoint straight into quantized weights
(`convert --from-hf DIR --quantize int8|int4`): the float checkpoint is never held whole.

The model is built in float with its initialisers skipped (no page of a weight is
touched until it is written). Then, weight by weight as the reader yields them, each
projection is written in float and at once quantized by the same code `compress
quantize` runs on a float run -- Keras' own `Dense.quantize` for the attention and
dense-FFN projections, the shared experts and the untied output head, and
`DeepSeekMoE.quantize_experts` (Keras' primitives, `layers/expert_quant.py`) for the
routed experts, once a layer's three stacks are in -- so its float variable is
freed before the next is read: peak memory is the quantized model plus one layer's
float weights. What stays float, as `compress quantize` leaves it: the token
embedding, norms, the router, MLA's `kv_b_proj` (absorbed decoding folds it into the
query and output) and MTP modules' own projections.

The run records `compression.quantize` (+ what it included and the group size) like a
`compress quantize` run, and loads the same way.
"""

from __future__ import annotations

from deepseek_tf.compress.quantization import check_request, default_include
from deepseek_tf.config.loader import update_config
from deepseek_tf.convert.hf_weights import check_tensors, write_entry
from deepseek_tf.convert.safetensors_io import CheckpointReader
from deepseek_tf.convert.weight_map import shared_copies, weight_entries
from deepseek_tf.errors import ConfigError
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


def assign_quantized_weights(model, reader: CheckpointReader, compression) -> tuple[int, list]:
    """Checks the checkpoint against the float `model` (built with its initialisers
    skipped), then writes every variable and quantizes each projection of
    `compression.quantize_include` right after its weights are written.

    Returns:
        `(n_tensors, kept)`: the Hugging Face tensors read, and the variables written that
        stay float (the others were replaced by codes and scales).

    Raises:
        ConversionError: a tensor is missing, mis-shaped or unexpected (named).
    """
    mode, group_size = compression.quantize, compression.quantize_group_size
    entries = weight_entries(model)
    check_tensors(reader, entries, set(shared_copies(model)))
    n_tensors = sum(len(e.names) for e in entries)
    dense = {id(layer) for layer in model.quantizable_layers(compression.quantize_include)}
    moes = model.moe_modules() if "experts" in compression.quantize_include else []
    stacks_left = {id(moe): len(moe.expert_shapes()) for moe in moes}
    cfg = quantization_config(mode, compression.quantize_bits, group_size)
    kept = []
    entries.reverse()  # popped in model order: no list holds a written float variable
    with frozen_heap():
        while entries:
            entry = entries.pop()
            write_entry(entry, reader)
            owner = entry.owner
            if id(owner) in dense:  # a projection's `Dense`
                del entry
                owner.quantize(mode, config=cfg)  # its float kernel is freed here
            elif isinstance(owner, tuple) and id(owner[0]) in stacks_left:  # (moe, stack)
                del entry
                stacks_left[id(owner[0])] -= 1
                if not stacks_left[id(owner[0])]:
                    owner[0].quantize_experts(mode, group_size)
            else:
                kept.append(entry.variable)
            del owner
    return n_tensors, kept
