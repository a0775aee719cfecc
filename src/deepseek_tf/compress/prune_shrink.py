"""Structured pruning units, their 0/1 masks, and the physical shrinking of a masked model.

A `UnitGroup` is one layer's prunable units of one kind:

- `"heads"`: attention heads. MHA/GQA prunes whole kv groups (one kv head with the
  `n_heads / n_kv_heads` query heads that read it); MLA prunes single heads.
- `"ffn"`: hidden channels of a dense SwiGLU.
- `"experts"`: routed experts of a DeepSeekMoE (stacked weights, router column).

Every tensor a group touches is laid out unit-major along one axis (unit `u` owns
indices `[u * w, (u + 1) * w)`, `w = size / n_units`), as the layers' reshapes read them:
MHA `q_proj` columns `(H*Dh)` are `(Hkv, G, Dh)`, `k/v_proj` columns `(Hkv, Dh)`,
`o_proj` rows `(H*Dh)`; MLA `q(_b)_proj` columns `(H, Dn+Dr)`, `kv_b_proj` columns
`(H, Dn+Dv)`, `o_proj` rows `(H, Dv)`; the relative-bias table's columns are heads.

Masking zeroes a dead unit's slices, so a dead head outputs zeros (its values and its
`o_proj` rows are zero), a dead channel `silu(0) * 0 = 0`, and a dead expert is never
routed to (its selection bias is -1e9). `shrink` then builds the narrower model from
`layer_n_heads` / `layer_ffn_dims` / `layer_n_experts` and copies the kept slices, so the
shrunk model computes what the masked one does (exactly, except softmax routers without
`norm_topk_prob`, whose gate weights are renormalised over the kept experts).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from deepseek_tf.config.loader import update_config
from deepseek_tf.layers.structure import PrunableUnits
from deepseek_tf.models.builder import build_model

DEAD_BIAS = -1e9  # selection bias of a masked expert: never among the top k


@dataclasses.dataclass
class UnitGroup:
    """One layer's prunable units of one kind (its `PrunableUnits`), and which are alive.

    Attributes:
        layer: decoder block index.
        units: the layer's declaration (`layers.structure.PrunableUnits`).
        keep: units kept at the final sparsity.
        bias0: the router's selection bias before pruning (experts).
        method0: the router's `topk_method` before pruning (experts).
        alive: `(n_units,)` bool.
        masks: one 0/1 `tf.Variable` per weight slice, broadcastable to the weight; the
            training step multiplies the weights by them after every update.
    """

    layer: int
    units: PrunableUnits
    keep: int
    bias0: np.ndarray | None = None
    method0: str = ""
    alive: np.ndarray = None
    masks: list = None

    def __post_init__(self):
        if self.alive is None:
            self.alive = np.ones(self.n_units, bool)
        if self.masks is None:
            self.masks = []
            for sl in self.units.slices:
                var = sl.variable
                shape = [1] * len(var.shape)
                shape[sl.axis] = var.shape[sl.axis]
                self.masks.append(tf.Variable(tf.ones(shape, var.dtype), trainable=False))

    kind = property(lambda self: self.units.kind)
    n_units = property(lambda self: self.units.n_units)
    heads_per_unit = property(lambda self: self.units.heads_per_unit)
    router = property(lambda self: self.units.router)

    @property
    def slices(self) -> list:
        """`(variable, axis, role)` of every weight the units own."""
        return [(sl.variable, sl.axis, sl.role) for sl in self.units.slices]

    def indices(self, var, axis: int) -> np.ndarray:
        """Kept indices of `var` along `axis` (every kept unit's whole slice)."""
        width = var.shape[axis] // self.n_units
        kept = np.flatnonzero(self.alive)
        return (kept[:, None] * width + np.arange(width)[None, :]).reshape(-1)  # (K*w,)


def find_groups(model, targets, keep_counts) -> list[UnitGroup]:
    """The `UnitGroup`s of `model` for `targets`, from its layers' `prunable_units()`.

    Args:
        model: a built `CausalLM` (MTP modules are left alone).
        targets: subset of `("heads", "ffn", "experts")`.
        keep_counts: `{(kind, layer): units kept}` from the pruning plan.
    """
    groups = []
    for i, layer_units in enumerate(model.prunable_units()):
        for units in layer_units:
            if units.kind not in targets or (units.kind, i) not in keep_counts:
                continue
            group = UnitGroup(i, units, keep_counts[(units.kind, i)])
            if units.router is not None:
                group.bias0 = np.array(units.router.e_score_correction_bias.numpy())
                group.method0 = units.router.topk_method
            groups.append(group)
    return groups


def prepare_routers(groups) -> None:
    """Routes every pruned MoE through its selection bias (`noaux_tc`) before any tracing.

    `greedy` routers (and group-limited ones of one group) pick the same experts
    as `noaux_tc` with a zero bias; the bias then keeps masked experts out.
    """
    for g in groups:
        if g.router is not None and g.router.topk_method != "noaux_tc":
            g.router.topk_method = "noaux_tc"
            g.router.e_score_correction_bias.assign(np.zeros_like(g.bias0))


def apply_masks(groups) -> None:
    """Sets the groups' masks from `alive`, zeroes the dead units' weights and keeps dead
    experts from being routed to (eagerly, when units die)."""
    for g in groups:
        if g.alive.all():
            continue
        for (var, axis, _), mask in zip(g.slices, g.masks):
            width = var.shape[axis] // g.n_units
            mask.assign(
                np.repeat(g.alive, width).astype(mask.dtype.as_numpy_dtype).reshape(mask.shape)
            )
            var.assign(var * mask)
        if g.router is not None:
            kept = g.bias0 if g.method0 == "noaux_tc" else np.zeros_like(g.bias0)
            g.router.e_score_correction_bias.assign(np.where(g.alive, kept, DEAD_BIAS))


def masked_update(groups):
    """The training step's `after_update`: multiplies every pruned weight by its mask, so
    dead units stay zero through the optimizer's updates (in the compiled step)."""

    def after_update():
        for g in groups:
            for (var, _, _), mask in zip(g.slices, g.masks):
                var.assign(var * tf.cast(mask, var.dtype))

    return after_update


def _relative(path: str) -> str:
    """A variable path without the model's own (instance-numbered) name."""
    return path.split("/", 1)[1]


def shrunk_config(config, groups):
    """`config` with the groups' kept widths in `compression.layer_n_heads/ffn_dims/n_experts`
    (validated again)."""
    c = config.compression
    n = config.model.n_layers
    widths = {
        "heads": list(c.layer_n_heads or [0] * n),
        "ffn": list(c.layer_ffn_dims or [0] * n),
        "experts": list(c.layer_n_experts or [0] * n),
    }
    for g in groups:
        widths[g.kind][g.layer] = int(g.alive.sum()) * g.heads_per_unit
    return update_config(
        config,
        compression={
            "layer_n_heads": widths["heads"] if any(widths["heads"]) else [],
            "layer_ffn_dims": widths["ffn"] if any(widths["ffn"]) else [],
            "layer_n_experts": widths["experts"] if any(widths["experts"]) else [],
        },
    )


def shrink(model, config, groups):
    """Builds the narrower model of the masked `model` and copies its kept weights.

    Returns:
        `(new_config, new_model)`.
    """
    new_config = shrunk_config(config, groups)
    new_model = build_model(new_config, model.vocab_size)
    take, biases = {}, {}
    for g in groups:
        for var, axis, _ in g.slices:
            take[_relative(var.path)] = (axis, g.indices(var, axis))
        if g.router is not None:
            biases[_relative(g.router.e_score_correction_bias.path)] = g.bias0[g.alive]
    source = {_relative(v.path): v for v in model.weights}
    for var in new_model.weights:
        key = _relative(var.path)
        if key in biases:
            var.assign(biases[key])
            continue
        if key not in source:
            if "seed_generator" in key:  # random state, not a weight
                continue
            raise KeyError(f"shrink: no source weight for {key}")
        value = source[key].numpy()
        if key in take:
            axis, index = take[key]
            value = np.take(value, index, axis=axis)
        var.assign(value)
    return new_config, new_model


def unstructured_prune(model, fraction: float) -> int:
    """Zeroes the `fraction` smallest-magnitude weights of each block projection.

    Attention and feed-forward kernels, shared and routed experts of the decoder blocks
    (not embeddings, head, norms, routers or MTP modules); shapes stay. Returns the
    number of weights zeroed.
    """
    zeroed = 0
    for var in model.weights:
        parts = var.path.split("/")
        if not any(p.startswith("block_") for p in parts) or not var.trainable:
            continue
        projection = parts[-1] == "kernel" and "_proj" in parts[-2]
        if not (projection or parts[-1].startswith("experts_")):
            continue
        value = np.array(var.numpy())
        k = int(fraction * value.size)
        if k <= 0:
            continue
        threshold = np.partition(np.abs(value).reshape(-1), k - 1)[k - 1]
        mask = np.abs(value) > threshold
        zeroed += int(value.size - mask.sum())
        var.assign(value * mask)
    return zeroed
