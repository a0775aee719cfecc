"""Quantized model structure: Keras' quantization configs and the variables a quantized run
stores, for the builder (loading a quantized run) and `compress quantize` (making one).

Which layers are quantized is the model's own declaration (`CausalLM.quantizable_layers`);
this module only maps a mode (`int8 | int4 | float8 | gptq | awq`) to Keras' objects.
"""

from __future__ import annotations

import contextlib
import gc

from keras.quantizers import AWQConfig, GPTQConfig, Int4QuantizationConfig

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
    if c.quantize in ("int8", "int4", "float8"):
        # (routed experts were built quantized: the builder passes `expert_quantize`)
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
