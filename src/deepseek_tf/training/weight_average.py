"""The run's averaged weights (`train.ema_decay`): what validation, checkpoints and serving see.

Keras' optimizers keep the exponential moving average themselves (`use_ema`,
`ema_momentum`; `make_optimizer` sets them), updated inside `optimizer.apply`, so the
one training step needs nothing more. What Keras leaves to the caller is *using* it
without ending training (`finalize_variable_values` overwrites the weights for
good): this class swaps the average into the model for a validation or a save and
the trained weights back afterwards.

A checkpoint holds the averaged weights as the model's own, so `eval`, `generate`,
`serve`, `export`, `convert` and `train --init-from` read the average with no
change, and the trained weights beside them (`trained_weights`) for `--resume`.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from deepseek_tf.errors import ConfigError
from deepseek_tf.training.optim import optimized_variables


class TrainedWeights(tf.__internal__.tracking.AutoTrackable):
    """The trained (not averaged) weights a checkpoint keeps for `--resume`."""

    def __init__(self, variables):
        self.values = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="trained")
            for v in variables
        ]


def check_same_averaging(previous, config) -> None:
    """`--resume` keeps averaging on or off: the optimizer's variables (its moving average
    among them) are restored by position, and an average cannot start mid-run."""
    if previous is not None and bool(previous.train.ema_decay) != bool(config.train.ema_decay):
        raise ConfigError(
            f"train.ema_decay: the run was trained with {previous.train.ema_decay:g} and "
            f"resumes with {config.train.ema_decay:g}; averaging cannot be switched on or off "
            "mid-run (the decay itself may change)"
        )


class WeightAverage:
    """Swaps the optimizer's moving average of the weights in and out of the model.

    Args:
        model: the model being trained.
        optimizer: its optimizer, from `make_optimizer` (built; `use_ema` on when
            `decay` > 0).
        decay: `train.ema_decay`; 0 makes every method a no-op.

    Create it in the distribution strategy's scope, after the optimizer, and give
    `checkpoint_objects()` to the run's checkpoint.

    Example (the trainer's use):

        average = WeightAverage(model, optimizer, decay=0.995)
        checkpoint = RunCheckpoint(directory, model, optimizer, extra=average.checkpoint_objects())
        ...  # training steps: optimizer.apply keeps the average
        with average.averaged():
            evaluate(model, dataset)  # the average's validation loss
            checkpoint.save(step)  # the average as the model, the trained weights beside it
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, decay: float):
        self.decay = decay
        self.optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # under loss scaling
        self.variables = optimized_variables(model) if decay else []
        self.trained = TrainedWeights(self.variables) if decay else None

    def checkpoint_objects(self) -> dict:
        """`{name: trackable}` for the run's checkpoint (empty when averaging is off)."""
        return {"trained_weights": self.trained} if self.trained is not None else {}

    @property
    def active(self) -> bool:
        """True once there is an average to swap in (after the first optimizer step)."""
        return bool(self.decay) and int(self.optimizer.iterations.numpy()) > 0

    @contextlib.contextmanager
    def averaged(self):
        """Inside: the model holds the average; after: the trained weights again."""
        if not self.active:
            yield
            return
        for keep, v in zip(self.trained.values, self.variables):
            keep.assign(v)
        self.optimizer.finalize_variable_values(self.variables)  # Keras' swap-in
        try:
            yield
        finally:
            self.restore_trained()

    def restore_trained(self) -> None:
        """After restoring a checkpoint (the model now holds its average): the trained
        weights back into the model, to continue training from them."""
        if not self.active:  # every save after a step swapped the average in
            return
        for v, keep in zip(self.variables, self.trained.values):
            v.assign(keep)
