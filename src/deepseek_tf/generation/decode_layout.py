"""A model's 16-bit weights held `(out, in)` for decoding on a CPU.

At batch 1 decoding multiplies one vector by every weight it uses, so its speed is the
speed at which those weights are read. XLA's CPU backend reads a 16-bit matrix at the
memory's bandwidth in a matrix-vector product only when the matrix's rows are the
outputs and the matrix is a parameter of the program as it is (no reshape between): 0.8
of this machine's read bandwidth, against 0.03-0.08 for Keras' `(in, out)` kernels
(`benchmarks/README.md`, decode_kernels), and ~0.2-0.45 for TensorFlow's own (oneDNN)
kernels (the 1.46B demonstration's profile of 2026-12-07, decode_real). So a model
decoded from memory on a CPU (`memory_bound.memory_bound_on_cpu`) in a 16-bit float
holds its projection kernels `(out, in)` and its routed-expert stacks `(E, out, in)`
(`apply`), and its batch-1 token step runs under XLA (`generation.decoding.DecodeLoop`).
Each weight is replaced by a new variable holding its transpose, so the layout costs no
memory once the old one is freed; `restore` puts the original layout back. A model in
this layout computes the same function (TensorFlow's kernels multiply it with
`transpose_b`), but its variables are not those of its checkpoint:
`training.checkpoint.RunCheckpoint` refuses to save it until `restore`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from deepseek_tf.generation.memory_bound import memory_bound_on_cpu, sixteen_bit
from deepseek_tf.layers.expert_stacks import ExpertStacks
from deepseek_tf.layers.structure import replace_weight


def wanted(model, cache_bytes: int | None = None) -> bool:
    """Whether `model` decodes faster in this layout here: 16-bit float weights read from
    memory on a CPU-only machine (`cache_bytes`: the CPU's last-level cache; None: read
    from the system)."""
    return sixteen_bit(model.variable_dtype) and memory_bound_on_cpu(model, cache_bytes)


def applied(model) -> bool:
    """Whether `model`'s weights are held in this layout (`apply`)."""
    return bool(getattr(model, "_decode_layout", False))


def _plain(layer) -> bool:
    """A `Dense` with a float kernel and no adapters or quantization (its subclasses,
    such as quantization-aware `FakeQuantDense`, keep their own arithmetic)."""
    return (
        type(layer) is keras.layers.Dense
        and layer.built
        and layer.quantization_mode is None
        and not layer.lora_enabled
        and sixteen_bit(layer._kernel.dtype)
    )


def _transposed_call(layer):
    """`layer.call` for a kernel held `(out, in)`: `Dense.call` with `transpose_b`."""

    def call(inputs, training=None):
        x = tf.reshape(inputs, (-1, layer._kernel.shape[1]))  # (N, in)
        y = tf.matmul(x, layer._kernel, transpose_b=True)  # (N, out)
        y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [layer.units]], 0))  # (..., out)
        if layer.bias is not None:
            y = y + layer.bias
        return layer.activation(y) if layer.activation is not None else y

    return call


def _flip(model, to_out_in: bool) -> int:
    count = 0
    for layer in model._flatten_layers(include_self=False):
        if _plain(layer) and getattr(layer, "kernel_out_in", False) != to_out_in:
            replace_weight(layer, "_kernel", tf.transpose(layer._kernel.value))
            layer.kernel_out_in = to_out_in
            if to_out_in:
                layer.call = _transposed_call(layer)
            else:
                del layer.call  # the class's again
            count += 1
        elif isinstance(layer, ExpertStacks) and layer.stacks_out_in != to_out_in:
            count += int(layer.transpose_stacks())
    model._decode_layout = to_out_in
    return count


def apply(model) -> int:
    """Holds `model`'s plain 16-bit `Dense` kernels `(out, in)` and its float routed-expert
    stacks `(E, out, in)`; returns how many weights moved (0 when already applied).

    Examples:
    >>> apply(model)  # doctest: +SKIP
    97
    """
    return 0 if applied(model) else _flip(model, True)


def restore(model) -> int:
    """Puts back the layout `apply` changed; returns how many weights moved."""
    return _flip(model, False) if applied(model) else 0
