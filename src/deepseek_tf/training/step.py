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
    mtp_loss_weight: float = 0.0,
):
    """Returns `step(inputs, targets, weights) -> dict of step statistics`.

    Inputs are `(B, T)` or, with gradient accumulation, `(A, B, T)`: `A`
    micro-batches whose gradients are averaged into one optimizer update. The
    objective is the next-token loss, plus `mtp_loss_weight` times the mean
    Multi-Token Prediction loss, plus the MoE balance losses. After the update,
    each MoE layer's routing bias moves against its expert load (DeepSeek-V3's
    auxiliary-loss-free balancing: no gradient involved).
    """
    variables = model.trainable_variables
    loss_scaled = hasattr(optimizer, "dynamic_scale")
    moe_layers = model.moe_modules()

    def losses(inputs, targets, weights):
        logits, stats = model.forward_with_stats(
            inputs, training=True, sparsity_threshold=sparsity_threshold
        )  # (B, T, V)
        out = {
            "loss": weighted_mean(token_losses(logits, targets), weights),
            "aux_loss": stats["aux_loss"],
            "activation_sparsity": stats["activation_sparsity"],
        }
        objective = out["loss"] + out["aux_loss"]
        if stats["mtp_logits"]:
            mtp = [  # depth k predicts targets[:, k:] from positions [:, :-k]
                weighted_mean(token_losses(lg, targets[:, k:]), weights[:, k:])
                for k, lg in enumerate(stats["mtp_logits"], start=1)
            ]
            out["mtp_loss"] = ops.mean(ops.stack(mtp))
            objective = objective + mtp_loss_weight * out["mtp_loss"]
        if "expert_load" in stats:
            out["expert_load"] = stats["expert_load"]  # (L_moe, E)
        return objective, out

    def loss_and_grads(inputs, targets, weights):
        with tf.GradientTape() as tape:
            objective, out = losses(inputs, targets, weights)
            # Each replica's gradients are summed by the optimizer: divide here.
            scaled = optimizer.scale_loss(objective / (replicas * accumulation))
        grads = tape.gradient(scaled, variables)
        if accumulation > 1:  # embedding gradients arrive as IndexedSlices: densify to sum
            grads = [tf.convert_to_tensor(g) for g in grads]
        return out, grads

    def accumulate(inputs, targets, weights):
        if accumulation == 1:
            return loss_and_grads(inputs, targets, weights)
        out, grads = loss_and_grads(inputs[0], targets[0], weights[0])
        for i in tf.range(1, accumulation):
            micro_out, micro_grads = loss_and_grads(inputs[i], targets[i], weights[i])
            out = {k: v + micro_out[k] for k, v in out.items()}
            grads = [g + mg for g, mg in zip(grads, micro_grads)]
        return {k: v / accumulation for k, v in out.items()}, grads

    def update_biases(out):
        if not moe_layers:
            return
        load = out["expert_load"]
        if replicas > 1:  # every replica applies the same, globally averaged, update
            context = tf.distribute.get_replica_context()
            load = context.all_reduce(tf.distribute.ReduceOp.MEAN, load)
        for i, layer in enumerate(moe_layers):
            layer.update_bias(load[i])

    def grad_norm(grads):
        norm = tf.linalg.global_norm(grads) * replicas  # undo the per-replica division
        return norm / optimizer.dynamic_scale if loss_scaled else norm

    def full_step(inputs, targets, weights):
        out, grads = accumulate(inputs, targets, weights)
        out["grad_norm"] = grad_norm(grads)
        optimizer.apply(grads, variables)  # clips by global norm, AdamW, schedule
        update_biases(out)
        return out

    if strategy is None or replicas == 1:
        return tf.function(full_step, jit_compile=jit_compile)

    # Several replicas: the optimizer's cross-replica reduction cannot live inside
    # an XLA cluster, so only forward/backward is compiled.
    compiled_grads = tf.function(accumulate, jit_compile=jit_compile)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    clip_norm = inner.global_clipnorm

    def clip_globally(grads):
        """All-reduces the gradients and clips them by the norm of the global gradient.

        Keras' optimizer clips *before* its own cross-replica sum, i.e. each replica's
        partial gradient, which is not the single-device update. So sum here, clip by
        the global norm, and hand each replica 1/replicas of the clipped sum: the
        optimizer's sum restores it, and its own clipping (norm <= clip/replicas) is a
        no-op. Costs a second gradient all-reduce per step.
        """
        grads = [tf.convert_to_tensor(g) for g in grads]  # IndexedSlices -> dense
        context = tf.distribute.get_replica_context()
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        norm = tf.linalg.global_norm(total)  # of the (loss-scaled) global gradient
        scale = optimizer.dynamic_scale if loss_scaled else 1.0
        factor = tf.minimum(1.0, clip_norm * scale / norm) / replicas
        # An inf/NaN norm (float16 overflow) gives NaN gradients: the loss-scale
        # optimizer then skips the step, as it would have.
        return [g * tf.cast(factor, g.dtype) for g in total], norm / scale

    def replica_step(inputs, targets, weights):
        out, grads = compiled_grads(inputs, targets, weights)
        if clip_norm:
            grads, out["grad_norm"] = clip_globally(grads)
        else:
            out["grad_norm"] = grad_norm(grads)  # of this replica's share of the batch
        optimizer.apply(grads, variables)
        update_biases(out)
        return out

    @tf.function
    def distributed_step(inputs, targets, weights):
        out = strategy.run(replica_step, args=(inputs, targets, weights))
        mean = tf.distribute.ReduceOp.MEAN
        return {k: strategy.reduce(mean, v, axis=None) for k, v in out.items()}

    return distributed_step
