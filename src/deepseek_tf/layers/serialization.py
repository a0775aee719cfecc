"""Layer plumbing: `get_config` from the `__init__` signature, bias-free projections."""

from __future__ import annotations

import inspect

import keras


def init_args(cls) -> list[str]:
    """Names of `cls.__init__`'s own arguments (not `self`, not `**kwargs`)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [
        p.name
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]


def init_config(obj) -> dict:
    """`{arg: obj.arg}` for every `__init__` argument; a missing attribute is a bug."""
    out = {}
    for name in init_args(type(obj)):
        value = getattr(obj, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def linear(
    units: int, init_std: float, dtype, name: str, *, rank: int = 0, fake_quant: bool = False
) -> keras.layers.Layer:
    """A bias-free projection with a normal(0, init_std) initialiser.

    A `Dense`; a `LowRankDense` of two factors when `rank > 0`; with `fake_quant`
    a `FakeQuantDense` (quantisation-aware training).
    """
    if rank:
        from deepseek_tf.layers.low_rank_dense import LowRankDense

        return LowRankDense(units, rank, init_std, fake_quant, dtype=dtype, name=name)
    if fake_quant:
        from deepseek_tf.layers.fake_quant_dense import FakeQuantDense

        cls = FakeQuantDense
    else:
        cls = keras.layers.Dense
    return cls(
        units,
        use_bias=False,
        kernel_initializer=keras.initializers.RandomNormal(stddev=init_std),
        dtype=dtype,
        name=name,
    )


def projection(layer, units: int, init_std: float, name: str, *, plain: bool = False):
    """`linear` for a projection of `layer`, shaped by the layer's `projection_ranks`
    (low-rank factors) and `fake_quant` (QAT) attributes; `plain=True` ignores both."""
    return linear(
        units,
        init_std,
        layer.dtype_policy,
        name,
        rank=0 if plain else layer.projection_ranks.get(name, 0),
        fake_quant=layer.fake_quant and not plain,
    )
