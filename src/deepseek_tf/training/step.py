"""The training step: forward, loss, backward, (accumulate), clip, update.

Read top to bottom; `make_train_step` only decides what gets compiled.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from deepseek_tf.training.evaluate import token_losses


def weighted_mean(values, weights):
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1.0)


def make_train_step(
    model,
    optimizer,
    *,
    accumulation: int,
    replicas: int,
    sparsity_threshold: float,
    jit_compile: bool,
    strategy=None,
):
    """Returns `step(inputs, targets, weights) -> {"loss", "grad_norm", "activation_sparsity"}`.

    Inputs are `(B, T)` or, with gradient accumulation, `(A, B, T)`: `A`
    micro-batches whose gradients are averaged into one optimizer update.
    """
    variables = model.trainable_variables
    loss_scaled = hasattr(optimizer, "dynamic_scale")

    def loss_and_grads(inputs, targets, weights):
        with tf.GradientTape() as tape:
            logits, stats = model.forward_with_stats(
                inputs, training=True, sparsity_threshold=sparsity_threshold
            )  # (B, T, V)
            loss = weighted_mean(token_losses(logits, targets), weights)
            # Each replica's gradients are summed by the optimizer: divide here.
            scaled = optimizer.scale_loss(loss / (replicas * accumulation))
        grads = tape.gradient(scaled, variables)
        if accumulation > 1:  # embedding gradients arrive as IndexedSlices: densify to sum
            grads = [tf.convert_to_tensor(g) for g in grads]
        return loss, grads, stats["activation_sparsity"]

    def accumulate(inputs, targets, weights):
        if accumulation == 1:
            return loss_and_grads(inputs, targets, weights)
        loss, grads, sparsity = loss_and_grads(inputs[0], targets[0], weights[0])
        for i in tf.range(1, accumulation):
            micro_loss, micro_grads, micro_sparsity = loss_and_grads(
                inputs[i], targets[i], weights[i]
            )
            loss += micro_loss
            sparsity += micro_sparsity
            grads = [g + mg for g, mg in zip(grads, micro_grads)]
        return loss / accumulation, grads, sparsity / accumulation

    def grad_norm(grads):
        norm = tf.linalg.global_norm(grads) * replicas  # undo the per-replica division
        return norm / optimizer.dynamic_scale if loss_scaled else norm

    def full_step(inputs, targets, weights):
        loss, grads, sparsity = accumulate(inputs, targets, weights)
        norm = grad_norm(grads)
        optimizer.apply(grads, variables)  # clips by global norm, AdamW, schedule
        return {"loss": loss, "grad_norm": norm, "activation_sparsity": sparsity}

    if strategy is None or replicas == 1:
        return tf.function(full_step, jit_compile=jit_compile)

    # Several replicas: the optimizer's cross-replica reduction cannot live inside
    # an XLA cluster, so only forward/backward is compiled.
    compiled_grads = tf.function(accumulate, jit_compile=jit_compile)

    def replica_step(inputs, targets, weights):
        loss, grads, sparsity = compiled_grads(inputs, targets, weights)
        norm = grad_norm(grads)  # local; reported for replica 0's share
        optimizer.apply(grads, variables)
        return {"loss": loss, "grad_norm": norm, "activation_sparsity": sparsity}

    @tf.function
    def distributed_step(inputs, targets, weights):
        out = strategy.run(replica_step, args=(inputs, targets, weights))
        mean = tf.distribute.ReduceOp.MEAN
        return {k: strategy.reduce(mean, v, axis=None) for k, v in out.items()}

    return distributed_step
