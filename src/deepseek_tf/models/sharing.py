"""Cross-layer weight sharing between adjacent blocks (the brief's parameter sharing).

Blocks `2i` and `2i + 1` form a pair. Two forms, set by the config:

- `model.share_adjacent` (`ffn`, `attention`, `both`): block `2i + 1` uses block `2i`'s
  whole sublayer when both have the same kind;
- `model.share_fraction` f in [0, 1] (the brief: "adjacent layers share 30% of their
  projection matrices"): of each pair's projection matrices -- the attention's, then
  the dense feed-forward's, each in its layer's `projections()` order (standard
  attention: q, k, v, o; MLA: its query, latent and output projections; SwiGLU: gate,
  up, down) -- the first `round(f * n)` are shared. A MoE feed-forward's experts are
  not projections of this kind and are never shared.

Sharing happens when the model is made (before its weights exist): the second block's
attribute then names the first block's Keras layer, so both train one set of weights and
a checkpoint holds it once. `ModelStructure.parameter_counts` counts a shared layer once
(`shared_saving`, which `deepseek-tf info` reports).
"""

from __future__ import annotations

import keras

SUBLAYERS = ("attention", "ffn")
WHOLE = {"ffn": ("ffn",), "attention": ("attention",), "both": ("ffn", "attention")}


def shareable_projections(first, second) -> list[tuple[str, str]]:
    """`(sublayer, projection)` names two adjacent blocks could share, in sharing order."""
    out = []
    for name in SUBLAYERS:
        a, b = getattr(first, name), getattr(second, name)
        if type(a) is not type(b) or not hasattr(a, "projections"):
            continue
        for proj in a.projections():
            if type(getattr(a, proj.name, None)) is keras.layers.Dense:
                out.append((name, proj.name))
    return out


def share_adjacent(blocks, mode: str = "none", fraction: float = 0.0) -> None:
    """Makes each pair of `blocks` share sublayers (`mode`) or a `fraction` of their
    projections (see the module docstring)."""
    for first, second in zip(blocks[0::2], blocks[1::2]):
        for name in WHOLE.get(mode, ()):
            if type(getattr(first, name)) is type(getattr(second, name)):
                setattr(second, name, getattr(first, name))
        if fraction > 0:
            candidates = shareable_projections(first, second)
            for sub, proj in candidates[: round(fraction * len(candidates))]:
                setattr(getattr(second, sub), proj, getattr(getattr(first, sub), proj))
