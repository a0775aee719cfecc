"""Routed-expert stacks sharded over the replicas of a `tf.distribute` strategy.

Expert parallelism (`runtime.expert_parallel: N`) stores each MoE layer's stacked
routed experts `(E, in, out)` as `N` shards of `E / N` experts: replica `r` holds shard
`r % N` (with more replicas than shards, `R / N` replicas hold each shard). A shard
is a per-replica ("on read") variable: inside `strategy.run` every replica reads and
updates its own shard, like a metric's per-replica accumulator.

Keras 3's distribution API (layouts, `ModelParallel`) is JAX-only and DTensor does not
run Keras 3 layers, so this is written on `tf.distribute`'s public collectives
(`ReplicaContext.all_gather` / `all_reduce`, differentiable), which hold for
`MirroredStrategy` over local devices and `MultiWorkerMirroredStrategy` alike.

Checkpoints keep the ordinary layout: a shard variable saves the whole `(E, in, out)`
stack (gathered from the replicas) under the usual key and restores by taking its
replica's slice, so a run trained with expert parallelism loads in one process, and
the reverse.
"""

from __future__ import annotations

import keras
import tensorflow as tf

ON_READ = tf.VariableSynchronization.ON_READ
FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA


def in_replicas() -> bool:
    """True inside `strategy.run` of a strategy with several replicas in sync."""
    if tf.distribute.in_cross_replica_context():
        return False
    return tf.distribute.get_replica_context().num_replicas_in_sync > 1


def shard_of_replica(shards: int):
    """This replica's shard index (a scalar int32 tensor), inside `strategy.run`."""
    return tf.distribute.get_replica_context().replica_id_in_sync_group % shards


def gather_full(variable, shards: int):
    """The whole stack `(E, ...)` of a per-replica shard variable, in cross-replica
    context: every replica's shard all-gathered (a collective: on a multi-worker job
    every worker calls it, as they all take part in saving a checkpoint)."""
    strategy = variable.distribute_strategy
    local = strategy.experimental_local_results(variable)  # replica r holds shard r % N
    if len(local) == strategy.num_replicas_in_sync:  # all in this process: no collective
        return tf.concat([tf.convert_to_tensor(shard) for shard in local[:shards]], axis=0)

    def replica_fn():
        context = tf.distribute.get_replica_context()
        return context.all_gather(tf.identity(variable), axis=0)  # (R * E/N, ...)

    gathered = strategy.experimental_local_results(strategy.run(replica_fn))[0]
    rows = variable.shape[0] * shards  # the first N blocks
    return tf.reshape(gathered[:rows], (rows, *variable.shape[1:]))  # (E, ...)


def scatter_full(variable, full, shards: int) -> None:
    """Assigns each replica its shard of the whole stack `full` `(E, ...)`."""
    strategy = variable.distribute_strategy
    rows = variable.shape[0]
    full = tf.convert_to_tensor(full, dtype=variable.dtype)

    def replica_fn():
        start = shard_of_replica(shards) * rows
        variable.assign(full[start : start + rows])

    strategy.run(replica_fn)


class ExpertShardVariable(keras.Variable):
    """A Keras variable holding this replica's `E / shards` experts of a stack.

    Trainable for Keras (its layer reports it), but not for TensorFlow: per-replica
    variables cannot be, so the training step watches it and updates it itself
    (`training.expert_parallel.ExpertUpdate`). Saved and restored as the whole stack.

    Args:
        initializer, shape, dtype, name: as `keras.Variable` (`shape` is the shard's).
        shards: the number of shards `N` of the stack.
    """

    def __init__(self, initializer, shape, dtype=None, name=None, *, shards: int):
        self.shards = shards
        super().__init__(
            initializer,
            shape=shape,
            dtype=dtype,
            trainable=True,
            aggregation="only_first_replica",
            synchronization="on_read",
            name=name,
        )

    def _initialize(self, value):
        self._value = tf.Variable(
            value,
            dtype=self._dtype,
            trainable=False,
            name=self.name,
            synchronization=ON_READ,
            aggregation=FIRST,
        )

    def _serialize_to_tensors(self):
        return {"VARIABLE_VALUE": gather_full(self._value, self.shards)}

    def _restore_from_tensors(self, restored_tensors):
        scatter_full(self._value, restored_tensors["VARIABLE_VALUE"], self.shards)


def per_replica_variables():
    """A variable-creator scope that makes every variable created in it per-replica
    ("on read", not trainable for TensorFlow): the expert optimizer's moments."""

    def creator(next_creator, **kwargs):
        kwargs.update(synchronization=ON_READ, aggregation=FIRST, trainable=False)
        return next_creator(**kwargs)

    return tf.variable_creator_scope(creator)
