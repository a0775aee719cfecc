"""Restoring a checkpoint's weights one variable at a time (streaming restore).

`tf.train.Checkpoint.restore` reads every tensor before assigning any, so a model being
loaded is held twice; and TensorFlow's CPU allocator keeps every page it ever used, so
peak memory stays at twice the model. Here each variable is matched through the
checkpoint's object graph exactly as `Checkpoint.restore` matches it, then read with its
own `RestoreV2` and assigned, one variable in flight per reader thread (one per core).
Together with variables built without running their initialisers
(`layers.deferred_init`), loading a run costs about one copy of its weights.

A floating-point tensor is cast to its variable's dtype (a run saved in float32 loads in
`model.dtype: bfloat16`, and back); other dtypes (int8 codes, counters) must match.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import keras
import tensorflow as tf

# The checkpoint's object graph (its file format, which TensorFlow exports no reader for).
from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

from deepseek_tf.training.checkpoint import RunCheckpoint

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # where tf.train.Checkpoint keeps its graph


class _Mismatch(Exception):
    """The checkpoint reads but does not fit the model."""


def _is_variable(obj) -> bool:
    return isinstance(obj, (tf.Variable, keras.Variable))


def checkpoint_variables(root) -> list:
    """The variables of `root`'s object graph (what a `tf.train.Checkpoint` saves).

    Args:
        root: a `tf.train.Checkpoint` (e.g. `RunCheckpoint.checkpoint`) or any trackable.

    Returns:
        The variables, in the graph's order.
    """
    return [o for o in tf.train.TrackableView(root).descendants() if _is_variable(o)]


def _name(variable) -> str:
    return getattr(variable, "path", None) or variable.name


def _fits(have: tuple, want: tuple) -> bool:
    """Whether a checkpoint tensor `(dtype name, shape)` restores into a variable's: the
    same shape, and the same dtype or both floating point (cast on assignment)."""
    floating = tf.as_dtype(have[0]).is_floating and tf.as_dtype(want[0]).is_floating
    return have[1] == want[1] and (have[0] == want[0] or floating)


def _restore_plan(root, prefix: str) -> list | None:
    """`[(variable, checkpoint key, dtype)]` for every variable of `root` (a
    `tf.train.Checkpoint`), matched through the checkpoint's object graph as
    `Checkpoint.restore` matches them; None when the graph holds state other than
    variables (then TensorFlow restores it).

    Raises:
        _Mismatch: a variable is missing from the checkpoint or differs in shape, or in a
            dtype that is not floating point on both sides.
    """
    reader = tf.train.load_checkpoint(prefix)
    graph = TrackableObjectGraph.FromString(reader.get_tensor(OBJECT_GRAPH_KEY))
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    plan, bound = [], set()
    for node_id, obj in tf.train.CheckpointView(prefix).match(root).items():
        attributes = graph.nodes[node_id].attributes
        if not attributes:
            continue
        if not _is_variable(obj) or [a.name for a in attributes] != ["VARIABLE_VALUE"]:
            return None
        key = attributes[0].checkpoint_key
        have = (dtypes[key].name, tuple(shapes[key]))
        want = (tf.as_dtype(obj.dtype).name, tuple(obj.shape))
        if not _fits(have, want):
            raise _Mismatch(f"{_name(obj)}: {have[0]}{list(have[1])} in the checkpoint, "
                            f"{want[0]}{list(want[1])} in the model")  # fmt: skip
        plan.append((obj, key, dtypes[key]))
        bound.add(id(obj))
    missing = [_name(v) for v in checkpoint_variables(root) if id(v) not in bound]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _Mismatch(f"{missing[0]}: not in the checkpoint{more}")
    return plan


def restore_weights(checkpoint: RunCheckpoint) -> int:
    """`checkpoint.restore(weights_only=True)` one variable at a time.

    The newest checkpoint that reads back is restored (a corrupt one is named and skipped,
    as `RunCheckpoint.restore` does); each variable is read with its own RestoreV2 and
    assigned, by one reader per core. A checkpoint holding state other than variables is
    restored by TensorFlow.

    Args:
        checkpoint: the run's checkpoint, made for the model to fill (no optimizer).

    Returns:
        The restored checkpoint's step.

    Raises:
        RunDirError: no checkpoint, none readable, or one that does not fit the model
            (the message names the variable).

    Examples:
    >>> checkpoint = RunCheckpoint("runs/tiny/checkpoints", model)  # doctest: +SKIP
    >>> restore_weights(checkpoint)  # doctest: +SKIP
    20
    """

    def restore_one(prefix):
        plan = _restore_plan(checkpoint.checkpoint, prefix)
        if plan is None:  # state other than variables: TensorFlow's restore
            return checkpoint.restore(prefix, weights_only=True)

        def read_and_assign(entry):
            variable, key, dtype = entry
            args = {"tensor_names": [key], "shape_and_slices": [""], "dtypes": [dtype]}
            value = tf.raw_ops.RestoreV2(prefix=prefix, **args)[0]
            variable.assign(
                value if value.dtype == variable.dtype else tf.cast(value, variable.dtype)
            )

        # one reader per core: a read runs in TensorFlow without the GIL, and one reader
        # alone took the 1.46B demonstration's 2.8 GB at ~1.3 GB/s from the page cache
        with ThreadPoolExecutor(max(1, min(len(plan), os.cpu_count() or 1))) as pool:
            list(pool.map(read_and_assign, plan))
        return int(checkpoint.step.numpy())

    return checkpoint.restore_first_readable(checkpoint.candidates(), restore_one)
