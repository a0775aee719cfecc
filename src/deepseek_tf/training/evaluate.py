"""Loss, perplexity and next-token accuracy of a model over a dataset."""

from __future__ import annotations

import math

import tensorflow as tf
from keras import ops

from deepseek_tf.errors import DataError
from deepseek_tf.training.losses import token_losses


def make_eval_step(model, jit_compile: bool):
    """Compiled step returning (sum of weighted loss, weighted correct, weight)."""

    def step(inputs, targets, weights):
        logits = model(inputs, training=False)  # (B, T, V)
        losses = token_losses(logits, targets)
        predicted = ops.cast(ops.argmax(logits, axis=-1), "int32")
        correct = ops.cast(ops.equal(predicted, ops.cast(targets, "int32")), "float32")
        return (
            ops.sum(losses * weights),
            ops.sum(correct * weights),
            ops.sum(weights),
        )

    return tf.function(step, jit_compile=jit_compile, reduce_retracing=True, autograph=False)


def evaluate(model, dataset, *, max_batches: int = 0, jit_compile: bool = False, step_fn=None):
    """Averages over `dataset` of `(inputs, targets, weights)` batches.

    Args:
        model: the `CausalLM`.
        dataset: an iterable of `(inputs, targets, weights)` batches.
        max_batches: read at most this many batches (0: all).
        jit_compile: compile the default step with XLA.
        step_fn: a step from `make_eval_step` (reused across evaluations).

    Returns:
        dict with `loss`, `perplexity`, `accuracy` and `tokens`.

    Raises:
        DataError: the dataset holds no token to evaluate.
    """
    step_fn = step_fn or make_eval_step(model, jit_compile)
    total_loss = total_correct = total_weight = 0.0
    for i, (inputs, targets, weights) in enumerate(dataset):
        if max_batches and i >= max_batches:
            break
        loss, correct, weight = step_fn(inputs, targets, weights)
        total_loss += float(loss)
        total_correct += float(correct)
        total_weight += float(weight)
    if total_weight == 0:
        raise DataError("the evaluation data holds no sequence (is every text shorter than one?)")
    loss = total_loss / total_weight
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": total_correct / total_weight,
        "tokens": int(total_weight),
    }
