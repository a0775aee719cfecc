"""The one loop around the training step: steps from `start`, the caller's stop rules,
timing without the first (compiling) step, and non-finite losses."""

import math

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.errors import DataError, TrainingError
from deepseek_tf.training.loop import NonFiniteLoss, run_steps


def _batches(n):
    """`n` batches `(inputs, targets, weights)`; the loss of batch i is its inputs' value."""
    ones = np.ones((n, 2, 4), "float32")  # (N, B, T)
    values = np.arange(n, dtype="float32")[:, None, None] * ones
    return tf.data.Dataset.from_tensor_slices((values, ones, ones))


def _step(inputs, targets, weights):
    return {"loss": tf.reduce_mean(inputs), "grad_norm": tf.reduce_sum(weights)}


def test_steps_from_start_with_the_callers_rules():
    seen = []
    result = run_steps(
        _step,
        _batches(10),
        steps=8,
        start=2,
        on_step=lambda step, out: seen.append((step, float(out["grad_norm"]))),
        should_stop=lambda step: "enough" if step == 5 else None,
    )
    assert seen == [(3, 8.0), (4, 8.0), (5, 8.0)]  # steps 3..5, each with its statistics
    assert (result.step, result.stopped, result.losses) == (5, "enough", [0.0, 1.0, 2.0])
    assert result.timed_steps == 2 and result.timed_seconds > 0  # not the first step
    plain = run_steps(_step, iter(_batches(10)), steps=4)  # an iterator works as well
    assert (plain.step, plain.stopped, plain.losses) == (4, None, [0.0, 1.0, 2.0, 3.0])


def test_a_non_finite_loss_stops_unless_the_caller_judges():
    def diverging(inputs, targets, weights):
        out = _step(inputs, targets, weights)
        return {**out, "extra_loss": tf.math.log(2.0 - out["loss"])}  # -inf at step 3

    with pytest.raises(NonFiniteLoss, match=r"^extra loss became -inf at step 3$") as error:
        run_steps(diverging, _batches(5), steps=5)
    assert isinstance(error.value, TrainingError) and error.value.step == 3
    with pytest.raises(NonFiniteLoss, match="^loss became nan at step 1$"):
        run_steps(lambda *batch: {"loss": tf.constant(math.nan)}, _batches(2), steps=2)
    kept = run_steps(diverging, _batches(5), steps=5, stop_on_nonfinite=False)
    assert kept.step == 5 and kept.losses == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_running_out_of_data_is_a_one_line_error():
    with pytest.raises(DataError, match="^the training data ended after 2 batches, before step 3"):
        run_steps(_step, _batches(2), steps=3)
