"""Importance of prunable units: what `compress prune` removes first.

- `"magnitude"`: the product of the L2 norms of a unit's input-side and output-side
  weights (times its routed-token share for experts);
- `"gradient"`: the first-order Taylor term `sum |w * dL/dw|` over its weights,
  accumulated over the pruning events (each new estimate adds to half the old one);
- `"random"`: the baseline.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from deepseek_tf.data.pipeline import make_train_dataset
from deepseek_tf.training.step import make_objective

IMPORTANCE = ("magnitude", "gradient", "random")


class Scorer:
    """Importance scores of every group's units (see the module docstring)."""

    def __init__(self, model, config, tokenizer, groups, mode: str, batches: int, seed: int):
        self.model, self.groups, self.mode, self.batches = model, groups, mode, batches
        self.config, self.tokenizer = config, tokenizer
        self.rng = np.random.default_rng(seed)
        self.accumulated = [np.zeros(g.n_units) for g in groups]
        self._data = None
        self._fn = None

    def _batch(self):
        if self._data is None:
            ds = make_train_dataset(self.config.data, self.tokenizer, self.config.train.batch_size)
            self._data = iter(ds)
        return next(self._data)

    def _gradient_fn(self):
        variables = [v for g in self.groups for v, _, _ in g.slices if v.trainable]
        objective = make_objective(  # the training objective, evaluated without dropout
            self.model, mtp_loss_weight=self.config.model.mtp_loss_weight
        )

        def grads(inputs, targets, weights):
            with tf.GradientTape() as tape:
                total, _ = objective(inputs, targets, weights, training=False)
            return tape.gradient(total, variables)

        return variables, tf.function(grads, autograph=False)

    def _load_fn(self):
        def loads(inputs):
            x, out = self.model.embed(inputs), {}
            for i, block in enumerate(self.model.blocks):
                result = block(x)
                x = result["x"]
                if "expert_load" in result:
                    out[str(i)] = result["expert_load"]  # (E,)
            return out

        return tf.function(loads, autograph=False)

    def __call__(self) -> list[np.ndarray]:
        if self.mode == "random":
            return [self.rng.random(g.n_units) for g in self.groups]
        if self.mode == "gradient":
            if self._fn is None:
                self._fn = self._gradient_fn()
            variables, fn = self._fn
            taylor = {id(v): 0.0 for v in variables}
            for _ in range(self.batches):
                for v, grad in zip(variables, fn(*self._batch())):
                    if grad is not None:  # IndexedSlices (gathered tables) made dense
                        grad = tf.convert_to_tensor(grad).numpy()
                        taylor[id(v)] = taylor[id(v)] + np.abs(v.numpy() * grad)
            for k, g in enumerate(self.groups):
                fresh = sum(
                    per_unit_sum(taylor[id(v)], axis, g.n_units)
                    for v, axis, _ in g.slices
                    if v.trainable
                )
                self.accumulated[k] = 0.5 * self.accumulated[k] + fresh
            return [a.copy() for a in self.accumulated]
        return self._magnitude()

    def _magnitude(self) -> list[np.ndarray]:
        loads = {}
        if any(g.router is not None for g in self.groups):
            if self._fn is None:
                self._fn = self._load_fn()
            for _ in range(self.batches):
                for key, load in self._fn(self._batch()[0]).items():
                    loads[int(key)] = loads.get(int(key), 0.0) + load.numpy()
        scores = []
        for g in self.groups:
            score = np.ones(g.n_units)
            for role in ("in", "out"):
                squares = sum(
                    per_unit_sum(v.numpy() ** 2, axis, g.n_units)
                    for v, axis, r in g.slices
                    if r == role
                )
                score = score * np.sqrt(squares)
            if g.router is not None:
                score = score * loads[g.layer]
            scores.append(score)
        return scores


def per_unit_sum(value: np.ndarray, axis: int, n_units: int) -> np.ndarray:
    """`(n_units,)` sums of `value` over each unit's slice along `axis`."""
    return np.moveaxis(value, axis, 0).reshape(n_units, -1).sum(axis=1)  # (U, rest) -> (U,)
