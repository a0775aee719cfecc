"""Assigning a Hugging Face DeepSeek checkpoint's tensors to a built `CausalLM`.

Shared by `convert --from-hf` (which then writes a run) and `train --init-from
HF_DIR` (which fine-tunes the model in place): every expected tensor must be
present with its shape and nothing unexplained may be left; each variable is
assigned from its tensors as they are read, in the variable's dtype (bfloat16
tensors into a bfloat16 model without a float32 copy; FP8 dequantised one
tensor at a time), so no second copy of the model is ever held.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from deepseek_tf.convert.safetensors_io import CheckpointReader, ConversionError
from deepseek_tf.convert.weight_map import IGNORABLE, shared_copies, weight_entries

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def check_tensors(reader: CheckpointReader, entries, ignorable: set[str]) -> None:
    """Every expected tensor present with its shape, and nothing unexplained besides."""
    expected = set()
    for entry in entries:
        for name in entry.names:
            expected.add(name)
            if name not in reader:
                raise ConversionError(f"{name}: missing")
            if reader.shape(name) != entry.hf_shape:
                raise ConversionError(
                    f"{name}: shape {reader.shape(name)}, expected {entry.hf_shape}"
                )
    extra = [
        k
        for k in reader.names()
        if k not in expected and k not in ignorable and not IGNORABLE.search(k)
    ]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(f"{extra[0]}: unexpected tensor for this config{more}")


def assign_hf_weights(model, reader: CheckpointReader) -> int:
    """Checks the checkpoint against `model` and assigns every variable; returns the
    number of Hugging Face tensors read.

    Raises:
        ConversionError: a tensor is missing, mis-shaped or unexpected (named).
    """
    entries = weight_entries(model)
    check_tensors(reader, entries, set(shared_copies(model)))
    for entry in entries:
        target = NUMPY_DTYPES[str(entry.variable.dtype)]  # the router stays float32
        value = entry.to_keras([reader.get(name, target) for name in entry.names])
        entry.variable.assign(value)
        del value
    return sum(len(e.names) for e in entries)
