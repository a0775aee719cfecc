"""The training step: forward, loss, backward, (accumulate), clip, update, after-update.

The one step every trainer runs (`Trainer`, compression fine-tuning, distillation).
Read top to bottom; `make_train_step` only decides what gets compiled.
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.training.losses import objective as training_objective


def make_objective(
    model,
    *,
    mtp_loss_weight: float,
    sparsity_threshold: float = 1e-2,
    hard_loss_weight: float = 1.0,
    extra_loss=None,
):
    """`fn(inputs, targets, weights, training=True) -> (objective, parts)` (`losses.objective`).

    `extra_loss(inputs, targets, weights, logits) -> scalar` adds a term (distillation).
    """

    def fn(inputs, targets, weights, training=True):
        logits, stats = model.forward_with_stats(
            inputs, training=training, sparsity_threshold=sparsity_threshold
        )  # (B, T, V)
        extra = None if extra_loss is None else extra_loss(inputs, targets, weights, logits)
        return training_objective(
            logits,
            stats,
            targets,
            weights,
            mtp_loss_weight=mtp_loss_weight,
            hard_loss_weight=hard_loss_weight,
            extra=extra,
        )

    return fn


def global_norm(grads):
    """The global norm of (dense) `grads` in float32, whatever their dtypes."""
    return tf.linalg.global_norm([tf.cast(g, "float32") for g in grads])


def scale_gradients(grads, factor):
    """Each of `grads` times `factor`, in its own dtype."""
    return [g * tf.cast(factor, g.dtype) for g in grads]


def make_train_step(
    model,
    optimizer,
    *,
    accumulation: int = 1,
    replicas: int = 1,
    sparsity_threshold: float = 1e-2,
    jit_compile: bool = True,
    strategy=None,
    mtp_loss_weight: float = 0.0,
    hard_loss_weight: float = 1.0,
    extra_loss=None,
    after_update=None,
    variables=None,
    expert_update=None,
):
    """Returns `step(inputs, targets, weights) -> dict of step statistics`.

    Inputs are `(B, T)` or, with gradient accumulation, `(A, B, T)`: `A`
    micro-batches whose gradients are averaged into one optimizer update. The
    objective is `losses.objective`: the next-token loss, plus `mtp_loss_weight` times
    the mean Multi-Token Prediction loss, plus the MoE balance losses, plus
    `extra_loss` (see `make_objective`). A `LossScaleOptimizer` (float16) gets the
    loss scaled and its gradients unscaled. After the update each MoE layer's routing
    bias moves against its expert load (DeepSeek-V3's auxiliary-loss-free balancing:
    no gradient involved), then `after_update()` runs (e.g. re-applying pruning masks).

    Args:
        model: the `CausalLM`.
        optimizer: its optimizer (built for `variables`).
        accumulation: micro-batches per update.
        replicas: replicas in sync (several: `strategy` runs the step on each).
        sparsity_threshold: activation magnitude counted as inactive (monitor).
        jit_compile: compile with XLA.
        strategy: the distribution strategy (several replicas).
        mtp_loss_weight: lambda of the MTP loss.
        hard_loss_weight: weight of the data losses (distillation: `1 - alpha`).
        extra_loss: `fn(inputs, targets, weights, logits) -> scalar`, or None.
        after_update: `fn()` run in the step after the update, or None.
        variables: the variables trained (default: all trainable variables).
        expert_update: an `expert_parallel.ExpertUpdate` when the routed experts are
            sharded over the replicas: their gradients (each shard's covers the whole
            batch) join the global norm and are applied per replica, not all-reduced.
    """
    variables = list(model.trainable_variables if variables is None else variables)
    shards = list(expert_update.variables) if expert_update is not None else []
    sharded = {id(v) for v in shards}
    variables = [v for v in variables if id(v) not in sharded]
    loss_scaled = hasattr(optimizer, "dynamic_scale")
    moe_layers = model.moe_modules()
    losses = make_objective(
        model,
        mtp_loss_weight=mtp_loss_weight,
        sparsity_threshold=sparsity_threshold,
        hard_loss_weight=hard_loss_weight,
        extra_loss=extra_loss,
    )

    def loss_and_grads(inputs, targets, weights):
        with tf.GradientTape() as tape:
            tape.watch([v.value for v in shards])  # per-replica: not trainable for TF
            total, out = losses(inputs, targets, weights)
            # Each replica's gradients are summed by the optimizer: divide here.
            scaled = optimizer.scale_loss(total / (replicas * accumulation))
        grads = tape.gradient(scaled, variables + [v.value for v in shards])
        # An embedding's gradient arrives as IndexedSlices, one row per occurrence of a
        # token. Densify it (summing a repeated token's rows): Keras' Adam squares
        # IndexedSlices row by row, so its second moment of a repeated token would be
        # the sum of squares, not the square of the sum (a (V, d) tensor, as Adam's
        # moments already are).
        return out, [tf.convert_to_tensor(g) for g in grads]

    def accumulate(inputs, targets, weights):
        if accumulation == 1:
            return loss_and_grads(inputs, targets, weights)
        out, grads = loss_and_grads(inputs[0], targets[0], weights[0])
        # (unrolled with sharded experts: no collectives inside a while loop)
        for i in range(1, accumulation) if shards else tf.range(1, accumulation):
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
        norm = global_norm(grads) * replicas  # undo the per-replica division
        return norm / optimizer.dynamic_scale if loss_scaled else norm

    # This step clips by the global norm (in float32) and the optimizer does not:
    # Keras' own clipping takes the norm of an embedding gradient's rows (IndexedSlices),
    # not of the gradient, and multiplies every gradient by one float32 scale, which
    # fails on the mixed dtypes of a bfloat16 model (its router is float32).
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    clip_norm, inner.global_clipnorm = inner.global_clipnorm, None

    def full_step(inputs, targets, weights):
        out, grads = accumulate(inputs, targets, weights)
        out["grad_norm"] = grad_norm(grads)
        if clip_norm:
            factor = tf.minimum(1.0, clip_norm * replicas / out["grad_norm"])
            grads = scale_gradients(grads, factor)
        optimizer.apply(grads, variables)  # AdamW (or Lion, Muon), schedule
        update_biases(out)
        if after_update is not None:
            after_update()
        return out

    if strategy is None or replicas == 1:
        return tf.function(full_step, jit_compile=jit_compile)

    # Several replicas: the optimizer's cross-replica reduction cannot live inside
    # an XLA cluster, so only forward/backward is compiled.
    # The expert-parallel dispatch's collectives can be neither, nor inside a nested
    # tf.function (their merge_call): then forward/backward is traced with the step.
    compiled_grads = accumulate if shards else tf.function(accumulate, jit_compile=jit_compile)

    def clip_globally(grads, extra_square=0.0):
        """All-reduces the gradients and clips them by the norm of the global gradient.

        Keras' optimizer would clip *before* its own cross-replica sum, i.e. each
        replica's partial gradient, which is not the single-device update. So sum here,
        clip by the norm of the global gradient (with `extra_square`, the squared norm
        of sharded experts' gradients) and hand each replica 1/replicas of the clipped
        sum: the optimizer's sum restores it (its own clipping is off, see above).
        Costs a second gradient all-reduce per step. Also returns the norm and the
        clipping factor.
        """
        context = tf.distribute.get_replica_context()
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        norm = tf.sqrt(global_norm(total) ** 2 + extra_square)  # of the global gradient
        scale = optimizer.dynamic_scale if loss_scaled else 1.0
        factor = tf.minimum(1.0, clip_norm * scale / norm) / replicas
        # An inf/NaN norm (float16 overflow) gives NaN gradients: the loss-scale
        # optimizer then skips the step, as it would have.
        return scale_gradients(total, factor), norm / scale, factor * replicas

    def replica_step(inputs, targets, weights):
        out, grads = compiled_grads(inputs, targets, weights)
        grads, expert_grads = grads[: len(variables)], grads[len(variables) :]
        expert_square = 0.0
        if shards:  # each shard counted once, not once per replica holding it
            context = tf.distribute.get_replica_context()
            expert_square = context.all_reduce(
                tf.distribute.ReduceOp.SUM, global_norm(expert_grads) ** 2
            ) / (replicas // shards[0].shards)
        if clip_norm:
            grads, out["grad_norm"], factor = clip_globally(grads, expert_square)
            expert_grads = scale_gradients(expert_grads, factor)
        else:
            out["grad_norm"] = grad_norm(grads)  # of this replica's share of the batch
        optimizer.apply(grads, variables)
        if shards:
            expert_update.apply(expert_grads)
        update_biases(out)
        if after_update is not None:
            after_update()
        return out

    @tf.function
    def distributed_step(inputs, targets, weights):
        out = strategy.run(replica_step, args=(inputs, targets, weights))
        mean = tf.distribute.ReduceOp.MEAN
        return {k: strategy.reduce(mean, v, axis=None) for k, v in out.items()}

    return distributed_step
