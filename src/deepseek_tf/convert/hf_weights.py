"""Assigning a Hugging Face DeepSeek checkpoint's tensors to a built `CausalLM`.

Shared by `convert --from-hf` (which then writes a run) and `train --init-from
HF_DIR` (which fine-tunes the model in place): every expected tensor must be
present with its shape and nothing unexplained may be left; each variable is
written from its tensors as they are read, block by block into its own buffer, in
the variable's dtype (bfloat16 tensors into a bfloat16 model without a float32
copy; FP8 dequantised one tensor at a time), so no second copy of the model, nor
of a large weight, is ever held.
"""

from __future__ import annotations

import math

import keras
import ml_dtypes
import numpy as np
import tensorflow as tf

from deepseek_tf.convert import safetensors_io
from deepseek_tf.convert.safetensors_io import CheckpointReader, ConversionError
from deepseek_tf.convert.weight_map import EXPERTS, IGNORABLE, LINEAR, shared_copies, weight_entries

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
        write_entry(entry, reader)
    return sum(len(e.names) for e in entries)


def write_entry(entry, reader: CheckpointReader) -> None:
    """Writes `entry.variable` from its Hugging Face tensors, block by block as they are
    read, in the variable's own dtype (the router stays float32)."""
    target = NUMPY_DTYPES[str(entry.variable.dtype)]
    if _distributed(entry.variable):  # one assignment updates every replica
        entry.variable.assign(entry.to_keras([reader.get(n, target) for n in entry.names]))
        return
    for begin, block in value_blocks(entry, reader, target):
        write_block(entry.variable, begin, block)
        del block


def _distributed(variable) -> bool:
    """A variable mirrored by a `tf.distribute` strategy (no single buffer to write)."""
    inner = variable.value if isinstance(variable, keras.Variable) else variable
    return isinstance(inner, tf.distribute.DistributedValues)


def value_blocks(entry, reader: CheckpointReader, dtype):
    """Yields `(begin, block)`: `entry.to_keras` of its tensors in `dtype`, piece by piece
    as they are read (blocks of rows, transposed for a Dense kernel; one expert at a
    time), `begin` the block's first index in the variable."""
    if entry.layout == EXPERTS:  # E torch (out, in) -> (E, in, out), a few experts a block
        # (the float stack's shape: quantized experts' variable holds codes)
        shape = entry.float_shape or tuple(int(d) for d in entry.variable.shape)
        expert_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        step = max(1, safetensors_io.BLOCK_BYTES // max(1, expert_bytes))
        for first in range(0, shape[0], step):
            names = entry.names[first : first + step]
            block = np.empty((len(names), *shape[1:]), dtype)
            for j, name in enumerate(names):
                block[j] = reader.get(name, dtype).T
            yield (first, 0, 0), block
            del block
        return
    for start, rows in reader.row_blocks(entry.names[0], dtype):
        if entry.layout == LINEAR:  # torch (out, in) -> keras (in, out): rows become columns
            yield (0, start), rows.T
        else:
            yield (start,) + (0,) * (rows.ndim - 1), rows


def write_block(variable, begin, block: np.ndarray) -> None:
    """`variable[begin : begin + block.shape] = block`, in the variable's own buffer (a
    whole-variable block is assigned): a large weight never has a second full copy (and
    TensorFlow's conversion of an array makes two)."""
    if tuple(block.shape) == tuple(variable.shape):
        variable.assign(block)
        return
    # `variable[...].assign` reads the variable first, and that read makes the write copy it
    tf.raw_ops.ResourceStridedSliceAssign(
        ref=variable.handle,
        begin=list(begin),
        end=[b + n for b, n in zip(begin, block.shape)],
        strides=[1] * block.ndim,
        value=np.ascontiguousarray(block),
    )
