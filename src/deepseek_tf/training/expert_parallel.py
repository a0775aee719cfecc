"""Expert parallelism in training: shard a model's routed experts over the replicas and
update each replica's shard with the run's optimizer rule.

`runtime.expert_parallel: N` splits every MoE layer's routed experts into `N` shards
(`layers.expert_shards`); dense parameters stay data-parallel (mirrored, gradients
all-reduced by the optimizer as without it). Each shard's gradient already covers the
global batch (the dispatch's collectives carry it back), so it must not be all-reduced:
Keras' `optimizer.apply` all-reduces inside `strategy.run`, hence `ExpertUpdate`
applies Keras' own per-variable rule (`update_step`, after the decoupled weight decay)
of a twin optimizer whose moments are per-replica like the shards.
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.errors import ConfigError
from deepseek_tf.layers.expert_shards import gather_full, per_replica_variables, scatter_full
from deepseek_tf.training.optim import no_decay_variables


def check_expert_parallel(shards: int, replicas: int, model) -> None:
    """One-line errors for an `N` this strategy and model cannot shard by."""
    if shards == 1:
        return
    if replicas < 2 or replicas % shards:
        raise ConfigError(
            f"runtime.expert_parallel: {shards} does not divide the {replicas} replica(s) in "
            "sync (use runtime.strategy mirrored over several devices, or multi_worker)"
        )
    for i, layer in enumerate(model.moe_modules()):
        if layer.n_routed_experts % shards:
            raise ConfigError(
                f"runtime.expert_parallel: {shards} does not divide the "
                f"{layer.n_routed_experts} routed experts of MoE layer {i}"
            )


def check_same_shards(previous, config) -> None:
    """Resuming (`previous`: the run's config, None for a new run) keeps
    `runtime.expert_parallel`: its optimizer state is sharded by it."""
    if previous is None:
        return
    before, now = previous.runtime.expert_parallel, config.runtime.expert_parallel
    if before != now:
        raise ConfigError(
            f"runtime.expert_parallel: the run was trained with {before}, "
            f"not {now}; resume with the same value (eval, generate, "
            "serve, compress and convert load it with any)"
        )


def shard_model_experts(model, runtime, replicas: int) -> list:
    """Shards every MoE layer's routed experts into `runtime.expert_parallel` shards over
    `replicas` (in the strategy's scope); returns the shard variables, layer by layer
    (none for 1)."""
    shards = runtime.expert_parallel
    check_expert_parallel(shards, replicas, model)
    if shards == 1:
        return []
    variables = []
    for layer in model.moe_modules():
        variables += layer.shard_experts(shards)
    return variables


def checkpoint_objects(expert_update) -> dict:
    """What a run's checkpoint saves beside model and optimizer (`RunCheckpoint(extra=)`)."""
    return {} if expert_update is None else {"expert_optimizer": expert_update.state()}


class ExpertUpdate:
    """The optimizer update of the expert shards, run inside `strategy.run`.

    Args:
        optimizer: the run's (dense) optimizer; a twin of the same class and config,
            without clipping (the training step clips by the global norm), keeps the
            shards' moments, per replica.
        variables: the shard variables (`shard_model_experts`).
    """

    def __init__(self, optimizer, variables):
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        config = {**inner.get_config(), "global_clipnorm": None, "clipnorm": None}
        self.optimizer = type(inner).from_config(config)
        self.variables = list(variables)
        # the stacked (3-D) expert weights decay, as every weight of rank >= 2
        self.optimizer.exclude_from_weight_decay(var_list=no_decay_variables(self.variables))
        self.shards = self.variables[0].shards
        with per_replica_variables():
            self.optimizer.build(self.variables)

    def apply(self, grads) -> None:
        """Weight decay and `update_step` on this replica's shards, then one iteration."""
        opt = self.optimizer
        lr = opt.learning_rate  # the schedule at opt.iterations, as Keras' apply reads it
        for grad, variable in zip(grads, self.variables):
            if opt.weight_decay and opt._use_weight_decay(variable):  # noqa: SLF001
                decay = tf.cast(opt.weight_decay * lr, variable.dtype)
                variable.assign_sub(variable * decay)
            opt.update_step(tf.cast(grad, variable.dtype), variable, tf.cast(lr, variable.dtype))
        opt.iterations.assign_add(1)

    def state(self) -> ExpertOptimizerState:
        """The twin optimizer's state, to checkpoint beside the run's optimizer."""
        return ExpertOptimizerState(self.optimizer, self.shards)


class ExpertOptimizerState(tf.__internal__.tracking.Trackable):
    """Saves the twin optimizer's per-replica moments whole (gathered, as the shards
    themselves are saved) and its iteration count; restores each replica's slice.
    Resuming needs the same `expert_parallel` (the trainer checks it)."""

    def __init__(self, optimizer, shards: int):
        self.optimizer = optimizer
        self.shards = shards

    def _moments(self) -> dict:
        """`{name: tf variable}` of the optimizer's per-replica variables (its moments)."""
        return {
            f"v{i}": variable.value
            for i, variable in enumerate(self.optimizer.variables)
            if variable.value.synchronization == tf.VariableSynchronization.ON_READ
        }

    def _serialize_to_tensors(self):
        tensors = {"iterations": tf.identity(self.optimizer.iterations.value)}
        for name, value in self._moments().items():
            tensors[name] = gather_full(value, self.shards)
        return tensors

    def _restore_from_tensors(self, restored_tensors):
        self.optimizer.iterations.assign(restored_tensors["iterations"])
        for name, value in self._moments().items():
            scatter_full(value, restored_tensors[name], self.shards)
