"""Several LoRA adapters on one base model, chosen per row of a batch (multi-LoRA serving).

Each adapter comes from a `train.lora_rank` run fine-tuned from the served base (its
frozen weights must equal the base's: checked). For every projection any adapter
targets, the adapters' factors are stacked, row 0 all zeros (the base itself):
`a` `(N + 1, in, r)`, `b` `(N + 1, r, out)` with `b` already scaled by `alpha / rank`
(ranks differ between adapters: smaller ones are zero-padded, which changes nothing).
The projection then computes, for row `i` of its input,

    y_i = x_i @ W + (x_i @ a[ids[i]]) @ b[ids[i]]                  # (T, out)

with `ids` a variable set around every call (`MultiLora.rows`), so
one batch serves the base and any adapters at once (S-LoRA's / vLLM's batched LoRA,
written as two gathered einsums). Keras' `Dense` has a single adapter
(`enable_lora`); the per-row form is this module's, set on the targeted layers'
`call` (the base kernel stays the layer's own).

Routed-expert adapters are not supported (their stacked experts gather per token
already); MLA's `kv_b_proj` needs the naive decoding cache, since absorbed decoding
folds the kernel into fixed copies (`needs_naive_mla`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from deepseek_tf.errors import InputError
from deepseek_tf.models.lora import lora_targets, lora_variables


@dataclass(frozen=True)
class Adapter:
    """One adapter's factors by projection key (`lora.lora_targets`' keys).

    Attributes:
        name: the served model id that selects it.
        factors: `{key: (a (in, r), b (r, out) times alpha / rank)}` as float32 arrays.
    """

    name: str
    factors: dict


def dense_layers(model) -> dict:
    """Every plain `Dense` projection of `model`'s blocks, by its `lora_targets` key."""
    found = {}
    for i, block in enumerate(model.blocks):
        for key, _, layer in block.projection_layers():
            if type(layer) is keras.layers.Dense:
                found[f"blocks.{i}/{key}"] = layer
    return found


def read_adapter(name: str, lora_model, lora_config, base) -> Adapter:
    """The adapter of a loaded LoRA run (`lora_model`, its `lora_config`), checked
    against the served `base` model.

    Raises:
        InputError: not a LoRA run, adapters on routed experts, or a run whose frozen
            weights are not the base's (the message names the adapter).
    """
    t = lora_config.train
    if not t.lora_rank:
        raise InputError(f"--lora {name}: the run has no adapters (train.lora_rank is 0)")
    if "experts" in t.lora_targets:
        raise InputError(
            f"--lora {name}: adapters on routed experts cannot be served beside a base "
            "(merge them: convert --to-hf, or serve the run alone)"
        )
    adapters = {id(v) for v in lora_variables(lora_model)}
    frozen = [v for v in lora_model.weights if id(v) not in adapters]
    same = len(frozen) == len(base.weights) and all(
        tuple(a.shape) == tuple(b.shape) and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(frozen, base.weights)
    )
    if not same:
        raise InputError(f"--lora {name}: its frozen weights are not the served base's "
                         "(an adapter serves only beside the model it was trained on)")  # fmt: skip
    dense, _ = lora_targets(lora_model, t.lora_targets)
    factors = {}
    for key, layer in dense:
        scale = layer.lora_alpha / layer.lora_rank
        a = np.asarray(layer.lora_kernel_a, np.float32)
        factors[key] = (a, np.asarray(layer.lora_kernel_b, np.float32) * scale)
    return Adapter(name, factors)


def needs_naive_mla(adapters: list[Adapter]) -> bool:
    """True when an adapter changes `kv_b_proj` (MLA must then decode from full keys)."""
    return any(key.endswith("kv_b_proj") for a in adapters for key in a.factors)


class MultiLora:
    """The adapters installed on `model`'s targeted projections, selected per row.

    Args:
        model: the served base `CausalLM`.
        adapters: the adapters; adapter `i` is row index `i + 1` (0: the base).
        max_rows: the largest batch a compiled call runs.
    """

    def __init__(self, model, adapters: list[Adapter], max_rows: int):
        self.names = [a.name for a in adapters]
        self.ids = tf.Variable(tf.zeros((max_rows,), tf.int32), trainable=False)
        self._lock = threading.Lock()  # one caller's rows at a time (server threads)
        layers = dense_layers(model)
        keys = sorted({k for a in adapters for k in a.factors})
        for key in keys:
            layer = layers[key]
            d_in, d_out = (int(d) for d in layer._kernel.shape)
            rank = max(a.factors[key][0].shape[1] for a in adapters if key in a.factors)
            a_stack = np.zeros((len(adapters) + 1, d_in, rank), np.float32)
            b_stack = np.zeros((len(adapters) + 1, rank, d_out), np.float32)
            for i, adapter in enumerate(adapters, start=1):
                if key in adapter.factors:
                    a, b = adapter.factors[key]
                    a_stack[i, :, : a.shape[1]], b_stack[i, : b.shape[0]] = a, b
            _install(layer, tf.Variable(a_stack, trainable=False),
                     tf.Variable(b_stack, trainable=False), self.ids)  # fmt: skip

    def index(self, name: str) -> int:
        """The row index of adapter `name` (0: the base)."""
        return self.names.index(name) + 1

    @contextlib.contextmanager
    def rows(self, ids):
        """Within the block, row `i` of the model's calls uses adapter `ids[i]` (0: the
        base; rows beyond `ids` too); other threads' blocks wait."""
        ids = np.asarray(ids, np.int32)
        padded = np.zeros(int(self.ids.shape[0]), np.int32)
        padded[: len(ids)] = ids
        with self._lock:
            self.ids.assign(padded)
            yield


def _install(layer: keras.layers.Dense, a_stack, b_stack, ids) -> None:
    """Sets `layer.call` to the base projection plus each row's adapter (module docstring)."""

    def call(inputs, training=None):
        if len(inputs.shape) < 3:  # rows must be the batch's: (B, T, in), never flattened
            raise ValueError(f"{layer.name}: per-row adapters need (batch, ..., in) inputs")
        x = ops.matmul(inputs, layer.kernel)  # (B, ..., out)
        batch = tf.shape(inputs)[0]  # rows beyond `ids` (a large predict batch): the base
        rows = tf.pad(ids, [[0, tf.maximum(batch - tf.shape(ids)[0], 0)]])[:batch]  # (B,)
        a = ops.cast(tf.gather(a_stack, rows), inputs.dtype)  # (B, in, r)
        b = ops.cast(tf.gather(b_stack, rows), inputs.dtype)  # (B, r, out)
        x = x + tf.einsum("b...r,bro->b...o", tf.einsum("b...i,bir->b...r", inputs, a), b)
        if layer.bias is not None:
            x = ops.add(x, layer.bias)
        if layer.activation is not None:
            x = layer.activation(x)
        return x

    layer.call = call
