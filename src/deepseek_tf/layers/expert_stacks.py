"""The routed experts' stacked weights: float, int8/int4 codes, LoRA adapters.

`DeepSeekMoE` keeps each routed projection as one `(E, in, out)` stack
(`experts_gate`, `experts_up`, `experts_down`). This mixin owns how a stack is
stored and read back: float variables (trained), weight-only int8/int4 codes and
scales (`expert_quant`; `quantize_experts`), and optional low-rank adapters per
expert (`enable_lora`, the stacks' counterpart of Keras' `Dense.enable_lora`).
The dispatch paths read stacks only through `expert_stack`, which dequantizes and
adds the adapters after gathering the experts a tile uses.

Under expert parallelism (`shard_experts`) a float stack is a per-replica shard of
`E / N` experts (`expert_shards`); outside `strategy.run` it is read whole.

The host layer provides `expert_shapes()`, `init_std`, `output_init_std`,
`expert_quantize`, `expert_group_size`, `lora_rank`, `lora_alpha`, `d_model`,
`moe_hidden_dim`, `n_routed_experts` and `expert_parallel`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from deepseek_tf.layers import expert_quant
from deepseek_tf.layers.expert_shards import (
    ExpertShardVariable,
    gather_full,
    in_replicas,
    scatter_full,
)
from deepseek_tf.layers.structure import replace_weight


class ExpertStacks:
    """Storage of stacked routed-expert weights (a mixin of `DeepSeekMoE`)."""

    # float stacks held `(E, out, in)` for decoding (`transpose_stacks`); runtime state
    stacks_out_in = False

    def build_expert_stacks(self) -> None:
        """Creates the stacks in their stored form (float, or codes + scales restored
        from a checkpoint), and the adapters when `lora_rank` is set."""

        def weight(name, shape, std):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer=keras.initializers.RandomNormal(stddev=std),
                dtype=self.variable_dtype,
            )

        for name, shape in self.expert_shapes().items():
            if self.expert_quantize != "none":
                self._add_codes(name, shape, self.expert_quantize, self.expert_group_size)
                continue
            std = self.output_init_std if name == "experts_down" else self.init_std
            setattr(self, name, weight(name, shape, std))
        if self.lora_rank:
            self._add_lora(self.lora_rank)

    def enable_lora(self, rank: int, lora_alpha: float = 16.0) -> None:
        """Adds routed-expert adapters to a built layer and freezes the stacks."""
        if self.lora_rank:
            raise ValueError("lora is already enabled on the routed experts")
        if not self.built:
            raise ValueError("enable_lora: build the layer first")
        self._tracker.unlock()
        self._add_lora(rank)
        self._tracker.lock()
        self.lora_rank, self.lora_alpha = rank, lora_alpha

    def _add_lora(self, rank: int) -> None:
        for name, (e, i, o) in self.expert_shapes().items():
            a = self.add_weight(
                name=f"{name}_lora_a",
                shape=(e, i, rank),
                initializer=keras.initializers.HeUniform(),  # as Dense.enable_lora (and PEFT)
                dtype="float32",
            )
            b = self.add_weight(
                name=f"{name}_lora_b", shape=(e, rank, o), initializer="zeros", dtype="float32"
            )
            setattr(self, f"{name}_lora_a", a)
            setattr(self, f"{name}_lora_b", b)
            if self.expert_quantize == "none":
                getattr(self, name).trainable = False

    def lora_delta(self, name: str, index=None):
        """`lora_alpha / lora_rank * a @ b` of stack `name` `(E | n, in, out)` float32."""
        a, b = getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b")
        if index is not None:
            a, b = tf.gather(a, index), tf.gather(b, index)
        return (self.lora_alpha / self.lora_rank) * ops.matmul(a, b)  # (E, in, out)

    def merge_lora(self) -> None:
        """Folds the adapters into the float stacks and zeroes them (export, `--to-hf`)."""
        if self.expert_quantize != "none":
            raise ValueError("merge_lora: quantized experts keep their adapters separate")
        for name in self.expert_shapes():
            w = getattr(self, name)
            w.assign(ops.cast(ops.cast(w, "float32") + self.lora_delta(name), w.dtype))
            b = getattr(self, f"{name}_lora_b")
            b.assign(ops.zeros_like(b))

    def _add_codes(self, name: str, shape, mode: str, group_size: int) -> None:
        """Adds the non-trainable `{name}_codes` (int8) and `{name}_scale` (float32)."""
        for suffix, stored in expert_quant.stored_shapes(shape, mode, group_size).items():
            variable = self.add_weight(
                name=f"{name}_{suffix}",
                shape=stored,
                initializer="zeros" if suffix == "codes" else "ones",
                dtype="int8" if suffix == "codes" else "float32",
                trainable=False,
            )
            setattr(self, f"{name}_{suffix}", variable)

    def quantize_experts(self, mode: str, group_size: int = -1) -> None:
        """Replaces the float routed-expert stacks by `mode` (`"int8"` | `"int4"`) codes
        and scales (`expert_quant`), computed from the current weights."""
        if self.expert_quantize != "none":
            raise ValueError(f"the experts are already quantized ({self.expert_quantize})")
        if not self.built:
            raise ValueError("quantize_experts: build the layer first (it reads the weights)")
        for in_dim in (self.d_model, self.moe_hidden_dim):
            expert_quant.check_group_size(in_dim, group_size, "expert_group_size")
        self._tracker.unlock()
        for name, shape in self.expert_shapes().items():
            codes, scale = expert_quant.quantize(getattr(self, name).numpy(), mode, group_size)
            delattr(self, name)  # untracks the float variable
            self._add_codes(name, shape, mode, group_size)
            getattr(self, f"{name}_codes").assign(codes)
            getattr(self, f"{name}_scale").assign(scale)
        self._tracker.lock()
        self.expert_quantize, self.expert_group_size = mode, group_size

    def transpose_stacks(self) -> bool:
        """Holds the float stacks `(E, out, in)`, or back `(E, in, out)` (each call flips;
        `generation.decode_layout`): XLA's CPU backend multiplies a vector by a 16-bit
        matrix at the memory's bandwidth only when the matrix's rows are the outputs.
        Each stack is replaced by a new variable, so the layout costs no memory once the
        old one is freed. Returns False, changing nothing, for stacks it leaves as they
        are (quantized, with adapters, sharded)."""
        if self.expert_quantize != "none" or self.lora_rank or self.experts_sharded:
            return False
        for name in self.expert_shapes():
            replace_weight(self, name, tf.transpose(getattr(self, name).value, (0, 2, 1)))
        self.stacks_out_in = not self.stacks_out_in
        return True

    @property
    def experts_sharded(self) -> bool:
        """Whether the float stacks are per-replica shards (`shard_experts`)."""
        return isinstance(getattr(self, "experts_gate", None), ExpertShardVariable)

    def shard_experts(self, shards: int) -> list:
        """Splits the float stacks of a built layer into `shards` per-replica shards
        (expert parallelism; call in the scope of the strategy whose replicas hold
        them): replica `r` keeps experts `[s E/N, (s + 1) E/N)` of shard `s = r % N`,
        taken from the current weights. Returns the shard variables."""
        e = self.n_routed_experts
        if shards < 2 or e % shards:
            raise ValueError(f"expert_parallel: {shards} does not divide the {e} experts")
        if self.expert_quantize != "none" or self.lora_rank:
            raise ValueError("expert_parallel: quantized experts and expert LoRA are not sharded")
        if self.experts_sharded:
            raise ValueError("the experts are already sharded")
        self._tracker.unlock()
        variables = []
        for name, (_, i, o) in self.expert_shapes().items():
            full = getattr(self, name)
            value = tf.convert_to_tensor(full.value)  # (E, in, out)
            delattr(self, name)  # untracks the whole stack
            shard = ExpertShardVariable(
                "zeros", (e // shards, i, o), dtype=full.dtype, name=name, shards=shards
            )
            setattr(self, name, shard)
            scatter_full(shard.value, value, shards)
            variables.append(shard)
        self._tracker.lock()
        self.expert_parallel = shards
        return variables

    def expert_stack(self, name: str, index=None, after=None, transposed: bool = False):
        """Routed-expert stack `name` (`"experts_gate"`, ...) in the compute dtype:
        `(E, in, out)`, or the experts `index` picks `(n, in, out)`; with `transposed`
        `(E | n, out, in)` (free when the stacks are held so, `transpose_stacks`). Quantized
        stacks are gathered as codes and dequantized after the gather; `after` (the
        layer's input) makes a whole stack's dequantization wait for it -- it depends on
        no input, so TensorFlow's graph executor would otherwise run every layer's at
        once when a program starts (a float32 copy of all the experts)."""
        if self.expert_quantize == "none":
            w = getattr(self, name)
            if isinstance(w, ExpertShardVariable) and not in_replicas():  # outside .run
                w = gather_full(w.value, w.shards)  # (E, in, out)
            w = w if index is None else tf.gather(w, index)
        else:
            codes, scale = getattr(self, f"{name}_codes"), getattr(self, f"{name}_scale")
            if after is not None:
                with tf.control_dependencies([after]):
                    codes, scale = tf.identity(codes), tf.identity(scale)
            if index is not None:
                codes, scale = tf.gather(codes, index), tf.gather(scale, index)
            in_dim = self.expert_shapes()[name][1]
            w = expert_quant.dequantize(codes, scale, self.expert_quantize, in_dim, "float32")
        if self.lora_rank:  # adapters on a frozen (possibly quantized) base
            w = ops.cast(w, "float32") + self.lora_delta(name, index)
        if transposed != self.stacks_out_in:
            w = tf.transpose(w, (0, 2, 1))
        return ops.cast(w, self.compute_dtype)
