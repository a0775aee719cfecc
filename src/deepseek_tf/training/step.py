"""The training step: forward, loss, backward, (accumulate), clip, update, after-update.

The one step every trainer runs (`Trainer`, compression fine-tuning, distillation,
federated clients). `TrainStep` holds its parts, read top to bottom in the order they
run; `make_train_step` only decides what gets compiled. Everything the step does is an
argument: the clip norm included (the optimizer itself never clips).
"""

from __future__ import annotations

import keras
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


def check_unclipped(optimizer) -> None:
    """The step clips (`clip_norm`); an optimizer that clips too would clip twice, and
    Keras' clipping takes an embedding gradient's rows (IndexedSlices) for the gradient
    and fails on the mixed dtypes of a bfloat16 model (its router is float32)."""
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    inner = optimizer.inner_optimizer if loss_scaled else optimizer
    for name in ("global_clipnorm", "clipnorm", "clipvalue"):
        if getattr(inner, name, None):
            raise ValueError(
                f"make_train_step: the optimizer has {name}={getattr(inner, name)}; build it "
                "without clipping and pass clip_norm= to the step (make_optimizer does)"
            )


class TrainStep:
    """The parts of one training step, in the order they run (see `make_train_step`).

    `single_device` is the whole step on one device; `replica` the step of one replica
    under a distribution strategy, around `replica_grads` (`accumulate`, compiled apart
    by `compile`).
    """

    def __init__(self, model, optimizer, objective, *, clip_norm, accumulation, replicas,
                 after_update, variables, expert_update):  # fmt: skip
        self.optimizer = optimizer
        self.objective = objective
        self.clip_norm = clip_norm or 0.0
        self.accumulation = accumulation
        self.replicas = replicas
        self.after_update = after_update
        self.expert_update = expert_update
        self.shards = list(expert_update.variables) if expert_update is not None else []
        sharded = {id(v) for v in self.shards}
        self.variables = [v for v in variables if id(v) not in sharded]
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.moe_layers = model.moe_modules()
        self.replica_grads = self.accumulate

    # -- forward and backward -----------------------------------------------------------
    def loss_and_grads(self, inputs, targets, weights):
        """`(parts, grads)` of one micro-batch; grads of the scaled, divided loss."""
        with tf.GradientTape() as tape:
            tape.watch([v.value for v in self.shards])  # per-replica: not trainable for TF
            total, out = self.objective(inputs, targets, weights)
            # Each replica's gradients are summed by the optimizer: divide here.
            scaled = self.optimizer.scale_loss(total / (self.replicas * self.accumulation))
        grads = tape.gradient(scaled, self.variables + [v.value for v in self.shards])
        # An embedding's gradient arrives as IndexedSlices, one row per occurrence of a
        # token. Densify it (summing a repeated token's rows): Keras' Adam squares
        # IndexedSlices row by row, so its second moment of a repeated token would be
        # the sum of squares, not the square of the sum (a (V, d) tensor, as Adam's
        # moments already are).
        return out, [tf.convert_to_tensor(g) for g in grads]

    def accumulate(self, inputs, targets, weights):
        """`(parts averaged, grads summed)` over the `(A, B, T)` micro-batches (A > 1)."""
        if self.accumulation == 1:
            return self.loss_and_grads(inputs, targets, weights)
        first = self.loss_and_grads(inputs[0], targets[0], weights[0])

        def add(i, total):
            micro = self.loss_and_grads(inputs[i], targets[i], weights[i])
            return tf.nest.map_structure(tf.add, total, micro)

        if self.shards:  # unrolled with sharded experts: no collectives inside a while loop
            total = first
            for i in range(1, self.accumulation):
                total = add(i, total)
        else:  # an explicit loop: the step is traced without autograph (see `compile`)
            _, total = tf.while_loop(
                lambda i, _: i < self.accumulation, lambda i, t: (i + 1, add(i, t)), (1, first)
            )
        out, grads = total
        return {k: v / self.accumulation for k, v in out.items()}, grads

    # -- norm, clipping, update -----------------------------------------------------------
    def grad_norm(self, grads):
        """The norm of the (unscaled) gradient these per-replica `grads` stand for."""
        norm = global_norm(grads) * self.replicas  # undo the per-replica division
        return norm / self.optimizer.dynamic_scale if self.loss_scaled else norm

    def after_apply(self, out) -> None:
        """After the update: each MoE layer's routing bias moves against its expert load
        (auxiliary-loss-free balancing, no gradient), then the caller's `after_update`."""
        if self.moe_layers:
            load = out["expert_load"]
            if self.replicas > 1:  # every replica applies the same, globally averaged, update
                context = tf.distribute.get_replica_context()
                load = context.all_reduce(tf.distribute.ReduceOp.MEAN, load)
            for i, layer in enumerate(self.moe_layers):
                layer.update_bias(load[i])
        if self.after_update is not None:
            self.after_update()

    def single_device(self, inputs, targets, weights):
        """The whole step on one device: gradients, norm, clip, update, after-update."""
        out, grads = self.accumulate(inputs, targets, weights)
        out["grad_norm"] = self.grad_norm(grads)
        if self.clip_norm:  # by the global norm in float32 (see check_unclipped)
            factor = tf.minimum(1.0, self.clip_norm * self.replicas / out["grad_norm"])
            grads = scale_gradients(grads, factor)
        self.optimizer.apply(grads, self.variables)  # AdamW (or Lion, Muon), schedule
        self.after_apply(out)
        return out

    # -- several replicas -----------------------------------------------------------------
    def clip_globally(self, grads, extra_square=0.0):
        """All-reduces the gradients and clips them by the norm of the global gradient.

        Keras' optimizer would clip *before* its own cross-replica sum, i.e. each
        replica's partial gradient, which is not the single-device update. So sum here,
        clip by the norm of the global gradient (with `extra_square`, the squared norm
        of sharded experts' gradients) and hand each replica 1/replicas of the clipped
        sum: the optimizer's sum restores it. Costs a second gradient all-reduce per
        step. Returns `(grads, norm, clipping factor)`.
        """
        context = tf.distribute.get_replica_context()
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        norm = tf.sqrt(global_norm(total) ** 2 + extra_square)  # of the global gradient
        scale = self.optimizer.dynamic_scale if self.loss_scaled else 1.0
        factor = tf.minimum(1.0, self.clip_norm * scale / norm) / self.replicas
        # An inf/NaN norm (float16 overflow) gives NaN gradients: the loss-scale
        # optimizer then skips the step, as it would have.
        return scale_gradients(total, factor), norm / scale, factor * self.replicas

    def expert_square(self, expert_grads):
        """The squared norm of the sharded experts' gradients, each shard counted once
        (not once per replica holding it)."""
        if not self.shards:
            return 0.0
        context = tf.distribute.get_replica_context()
        square = context.all_reduce(tf.distribute.ReduceOp.SUM, global_norm(expert_grads) ** 2)
        return square / (self.replicas // self.shards[0].shards)

    def replica(self, inputs, targets, weights):
        """One replica's step (inside `strategy.run`)."""
        out, grads = self.replica_grads(inputs, targets, weights)
        n = len(self.variables)
        grads, expert_grads = grads[:n], grads[n:]
        if self.clip_norm:
            square = self.expert_square(expert_grads)
            grads, out["grad_norm"], factor = self.clip_globally(grads, square)
            expert_grads = scale_gradients(expert_grads, factor)
        else:
            out["grad_norm"] = self.grad_norm(grads)  # of this replica's share of the batch
        self.optimizer.apply(grads, self.variables)
        if self.shards:
            self.expert_update.apply(expert_grads)
        self.after_apply(out)
        return out

    def compile(self, *, jit_compile: bool, strategy=None):
        """The step as one `tf.function`: `single_device`, or `replica` on every replica."""
        if strategy is None or self.replicas == 1:
            # autograph=False: the step has no tensor-valued Python branch or loop, and
            # converting the model, the objective and the optimizer cost ~3.5 s per process
            return tf.function(self.single_device, jit_compile=jit_compile, autograph=False)
        # Several replicas: the optimizer's cross-replica reduction cannot live inside
        # an XLA cluster, so only forward/backward is compiled.
        # The expert-parallel dispatch's collectives can be neither, nor inside a nested
        # tf.function (their merge_call): then forward/backward is traced with the step.
        if not self.shards:
            self.replica_grads = tf.function(
                self.accumulate, jit_compile=jit_compile, autograph=False
            )

        @tf.function(autograph=False)
        def distributed_step(inputs, targets, weights):
            out = strategy.run(self.replica, args=(inputs, targets, weights))
            mean = tf.distribute.ReduceOp.MEAN
            return {k: strategy.reduce(mean, v, axis=None) for k, v in out.items()}

        return distributed_step


def make_train_step(
    model,
    optimizer,
    *,
    clip_norm: float | None = None,
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
    loss scaled and its gradients unscaled. The gradients are clipped to `clip_norm`
    by their global norm, then applied; each MoE layer's routing bias moves against its
    expert load (DeepSeek-V3's auxiliary-loss-free balancing: no gradient involved),
    then `after_update()` runs (e.g. re-applying pruning masks). The statistics are the
    objective's parts (`loss`, `aux_loss`, ...) and `grad_norm` (before clipping).

    Args:
        model: the `CausalLM`.
        optimizer: its optimizer (built for `variables`, without clipping of its own).
        clip_norm: the global gradient norm clipped to (`train.clip_norm`); None or 0:
            no clipping.
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

    Returns:
        The compiled step function.

    Examples:
        step = make_train_step(model, make_optimizer(t, model), clip_norm=t.clip_norm)
        out = step(inputs, targets, weights)  # {"loss", "grad_norm", ...}
    """
    check_unclipped(optimizer)
    objective = make_objective(
        model,
        mtp_loss_weight=mtp_loss_weight,
        sparsity_threshold=sparsity_threshold,
        hard_loss_weight=hard_loss_weight,
        extra_loss=extra_loss,
    )
    parts = TrainStep(
        model,
        optimizer,
        objective,
        clip_norm=clip_norm,
        accumulation=accumulation,
        replicas=replicas,
        after_update=after_update,
        variables=list(model.trainable_variables if variables is None else variables),
        expert_update=expert_update,
    )
    return parts.compile(jit_compile=jit_compile, strategy=strategy)
