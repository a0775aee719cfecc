"""What a layer declares about its own structure, once, for everything that reshapes it.

A layer that owns bias-free projections lists them as `Projection`s: name, input and
output width, which initialiser, and whether `compress lowrank` may factorise it and
post-training quantization (and QAT) may convert it. The layer creates and builds its
projections from that list (`make_projections`, `build_projections`); parameter counts,
quantization, low-rank factorisation and pruning read the same list (and the layer's
`PrunableUnits`) instead of re-deriving shapes from the config.

Everything here works on an unbuilt layer (no weights allocated), so the counts of a
671B-parameter shape come from the same declarations as a model that trains here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from deepseek_tf.layers.fake_quant_dense import FakeQuantDense
from deepseek_tf.layers.low_rank_dense import LowRankDense


@dataclass(frozen=True)
class Projection:
    """One bias-free projection `(in_dim) -> (out_dim)` a layer owns.

    Attributes:
        name: the attribute (and Keras layer) name, e.g. `"q_proj"`.
        in_dim: input width.
        out_dim: output width.
        output: an output projection (initialised with `output_init_std`).
        factorizable: `compress lowrank` may store it as two low-rank factors.
        quantizable: post-training quantization and QAT may convert it.
    """

    name: str
    in_dim: int
    out_dim: int
    output: bool = False
    factorizable: bool = True
    quantizable: bool = True

    def parameters(self, rank: int = 0) -> int:
        """Stored values: `in * out`, or `rank * (in + out)` as a factor pair."""
        return rank * (self.in_dim + self.out_dim) if rank else self.in_dim * self.out_dim


@dataclass(frozen=True)
class WeightSlice:
    """The part of a weight that belongs to a layer's prunable units.

    Unit `u` owns indices `[u * w, (u + 1) * w)` of `axis` (`w = size / n_units`).

    Attributes:
        layer: the (sub)layer holding the weight.
        attr: the weight's attribute on `layer` (`"kernel"`, `"experts_up"`, ...).
        axis: the units' axis.
        role: `"in"` / `"out"` (input- or output-side weights, which enter the
            magnitude score), or None (masked and sliced only).
    """

    layer: object
    attr: str
    axis: int
    role: str | None

    @property
    def variable(self):
        return getattr(self.layer, self.attr)


@dataclass(frozen=True)
class PrunableUnits:
    """A layer's units that structured pruning may remove.

    Attributes:
        kind: `"heads"` (attention heads; whole kv groups under GQA), `"ffn"`
            (hidden channels of a dense SwiGLU) or `"experts"` (routed experts).
        n_units: units the layer has.
        min_units: fewest units the layer can keep.
        slices: every weight the units own (see `WeightSlice`).
        heads_per_unit: query heads per unit (the GQA group size; 1 otherwise).
        router: the `TopKRouter` of an experts layer (None otherwise).
        blocks: equal contiguous blocks the units must shrink evenly (group-limited
            routing's expert groups: each keeps the same number of experts).
    """

    kind: str
    n_units: int
    min_units: int
    slices: tuple
    heads_per_unit: int = 1
    router: object = None
    blocks: int = 1


def projection_layer(
    units: int, init_std: float, dtype, name: str, *, rank: int = 0, fake_quant: bool = False
) -> keras.layers.Layer:
    """A bias-free projection with a normal(0, init_std) initialiser.

    A `Dense`; a `LowRankDense` of two factors when `rank > 0`; with `fake_quant`
    a `FakeQuantDense` (quantisation-aware training).
    """
    if rank:
        return LowRankDense(units, rank, init_std, fake_quant, dtype=dtype, name=name)
    cls = FakeQuantDense if fake_quant else keras.layers.Dense
    return cls(
        units,
        use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(stddev=init_std),
        dtype=dtype,
        name=name,
    )


def check_ranks(layer, projections) -> None:
    """Every `layer.projection_ranks` entry names one of its factorisable projections."""
    allowed = {p.name for p in projections if p.factorizable}
    for name in layer.projection_ranks:
        if name not in allowed:
            raise ValueError(
                f"{type(layer).__name__}: projection_ranks names {name!r}, not one of its "
                f"factorisable projections ({', '.join(sorted(allowed))})"
            )


def make_projections(layer) -> None:
    """Creates `layer.<name>` for each of `layer.projections()`.

    Low-rank factors come from `layer.projection_ranks`, int8 fake quantization from
    `layer.fake_quant`, each only where the declaration allows it.
    """
    projections = layer.projections()
    check_ranks(layer, projections)
    for p in projections:
        std = layer.output_init_std if p.output else layer.init_std
        rank = layer.projection_ranks.get(p.name, 0) if p.factorizable else 0
        fake_quant = layer.fake_quant and p.quantizable
        proj = projection_layer(
            p.out_dim, std, layer.dtype_policy, p.name, rank=rank, fake_quant=fake_quant
        )
        setattr(layer, p.name, proj)


def build_projections(layer, input_shape) -> None:
    """Builds each declared projection of `layer` for inputs `(..., in_dim)` (one shared
    with an adjacent block's, `models.sharing`, is built once)."""
    lead = tuple(input_shape[:-1])
    for p in layer.projections():
        proj = getattr(layer, p.name)
        if not proj.built:
            proj.build((*lead, p.in_dim))


def projection_parameters(layer) -> int:
    """Stored values of `layer`'s declared projections (factor pairs counted as such)."""
    return sum(
        p.parameters(layer.projection_ranks.get(p.name, 0) if p.factorizable else 0)
        for p in layer.projections()
    )


def count(*shapes) -> int:
    """Total elements of the given shapes."""
    return sum(math.prod(s) for s in shapes)


def replace_weight(layer, name: str, value) -> None:
    """Replaces `layer`'s variable attribute `name` by a new variable holding `value` (any
    shape; same trainability), the old one untracked. Keras' own `del layer.<name>` runs a
    full `gc.collect()` per variable (0.17 s each: 22 s for the 1.46B demonstration's 130)."""
    old = getattr(layer, name)
    trainable = old.trainable
    layer._untrack_variable(old)
    object.__delattr__(layer, name)
    del old
    layer._tracker.unlock()
    try:
        setattr(layer, name, layer.add_weight(
            name=name.lstrip("_"), shape=value.shape, dtype=value.dtype, trainable=trainable,
            initializer=lambda shape, dtype: value,
        ))  # fmt: skip
    finally:
        layer._tracker.lock()
