"""Quantized model structure: Keras' quantization configs and the variables a quantized run
stores, for the builder (loading a quantized run) and `compress quantize` (making one).

Which layers are quantized is the model's own declaration (`CausalLM.quantizable_layers`);
this module only maps a mode (`int8 | int4 | float8 | gptq | awq`) to Keras' objects.
"""

from __future__ import annotations

import contextlib
import gc

import tensorflow as tf
from keras import dtype_policies
from keras.quantizers import AWQConfig, GPTQConfig, Int4QuantizationConfig

# private: Keras resolves a mode into its config object here (see `quantized_structure`)
from keras.src.quantizers.quantization_config import (
    get_block_size_for_layer,
    validate_and_resolve_config,
)

from deepseek_tf.config.schema import CompressionConfig
from deepseek_tf.errors import CompressionError


class TokenIdsOnly:
    """The tokenizer GPTQ/AWQ configs require, for calibration data that is token ids."""

    def tokenize(self, text):
        raise CompressionError("calibration data must be token ids")


@contextlib.contextmanager
def frozen_heap():
    """Keras' `Layer.__delattr__` runs `gc.collect()` for every variable a layer drops, and
    quantizing drops each kernel: one full collection of the process's heap per layer
    (seconds each in a process holding a large model or many others). Objects alive
    before quantizing cannot become its garbage, so `gc.freeze()` takes them out of the
    collector's view while it runs (Keras' own collections then scan only new objects)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def quantization_config(mode: str, bits: int, group_size: int, dataset=None, sequence_length=0):
    """The Keras config object of `mode` (None: Keras' default for int8/float8).

    `dataset` (`(samples, seq)` token ids) calibrates GPTQ/AWQ; without it the config
    only describes the quantized layout (loading a run).
    """
    if mode == "int4" and group_size > 0:
        return Int4QuantizationConfig(block_size=group_size)
    if mode in ("gptq", "awq"):
        calibrated = dataset is not None
        return (GPTQConfig if mode == "gptq" else AWQConfig)(
            dataset,
            TokenIdsOnly(),
            weight_bits=bits,
            group_size=group_size,
            num_samples=len(dataset) if calibrated else 128,
            sequence_length=sequence_length if calibrated else 512,
        )
    return None


def apply_quantized_structure(model, c: CompressionConfig) -> None:
    """Gives a freshly built model the quantized variables a quantized run saved (as its
    `compression` section `c` records them).

    int8/int4/float8 quantize the (random) weights, which the checkpoint then
    overwrites; GPTQ/AWQ layers are built in their calibrated state directly.
    """
    layers = model.quantizable_layers(c.quantize_include)
    cfg = quantization_config(c.quantize, c.quantize_bits, c.quantize_group_size)
    if c.quantize in ("int8", "int4"):
        # (routed experts were built quantized: the builder passes `expert_quantize`)
        with frozen_heap():
            for layer in layers:
                quantized_structure(layer, c.quantize, cfg)
                inputs_first(layer)
        return
    if c.quantize == "float8":  # Keras' float8 adds scales beside the kernel: no arithmetic
        chosen = {id(layer) for layer in layers}
        if chosen:
            with frozen_heap():
                model.quantize(c.quantize, config=cfg, filters=lambda layer: id(layer) in chosen)
        return
    with frozen_heap():
        for layer in layers:
            layer.quantize(c.quantize, config=cfg)
            del layer._kernel  # what calibration does once the quantized kernel is written
            setattr(layer, f"is_{c.quantize}_calibrated", True)


def quantized_structure(layer, mode: str, config=None) -> None:
    """The variables and dtype policy `Dense.quantize(mode, config=config)` leaves on
    `layer` (`"int8"` or `"int4"`), without its arithmetic: loading a quantized run
    overwrites the codes anyway, and quantizing the (unwritten) float kernel would
    materialise float32 temporaries of every projection -- several times the output
    head's size -- that TensorFlow's CPU allocator then keeps. Keras has no public
    structure-only build, so this follows Keras 3.15's `Layer.quantize` wrapper and
    `Dense.quantize` step by step (its config resolution, `_kernel`, `quantized_build`,
    the `"{mode}_from_{policy}"` dtype policy);
    `tests/models/test_quantized_structure.py` fails if the two drift apart."""
    config = validate_and_resolve_config(mode, config)
    mode = config.mode
    layer._check_quantize_args(mode, layer.compute_dtype)
    layer._tracker.unlock()
    try:
        shape = tuple(layer._kernel.shape)
        layer.quantization_config = config
        del layer._kernel
        layer.quantized_build(shape, mode, config)
        if layer.dtype_policy.quantization_mode is None:
            name = mode
            if mode == "int4":
                block = get_block_size_for_layer(layer, config)
                name = f"int4/{-1 if block is None else block}"
            layer.dtype_policy = dtype_policies.get(f"{name}_from_{layer.dtype_policy.name}")
    finally:
        layer._tracker.lock()


def inputs_first(layer) -> None:
    """Makes a quantized `Dense`'s weight-only work (unpacking int4 codes, widening them)
    wait for the layer's inputs. That work depends on no input, so TensorFlow's graph
    executor would run every layer's as soon as a program starts, all at once: a float
    copy of every quantized projection alive together (with `expert_stack(after=)`, the
    int4 moonshot's `generate` peaked at 15.7 GB before and 12.8 GB after:
    `benchmarks/moonshot.py`). Keras calls `quantized_call` for a quantized
    layer; the instance's own is wrapped (the numbers are unchanged)."""
    call = layer.quantized_call

    def quantized_call(inputs, *args, **kwargs):
        with tf.control_dependencies([inputs]):
            return call(inputs, *args, **kwargs)

    layer.quantized_call = quantized_call
