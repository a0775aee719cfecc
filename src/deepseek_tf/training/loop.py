"""The one loop around the training step.

The trainer, compression fine-tuning (`compress.finetune`) and federated clients
(`federated.client`) all run `run_steps`; each brings its own step function, data and
stop rules (`on_step`, `should_stop`). The loop reads a batch, runs the step, times it
(the first step, which compiles, apart), stops on a non-finite loss and hands the step's
statistics to the caller.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable

from deepseek_tf.data.pipeline import next_batch
from deepseek_tf.errors import DataError, TrainingError


class NonFiniteLoss(TrainingError):
    """The loss (or the step's extra loss) of step `step` became `value` (inf or NaN)."""

    def __init__(self, name: str, value: float, step: int):
        super().__init__(f"{name} became {value} at step {step}")
        self.value, self.step = value, step


@dataclasses.dataclass
class LoopResult:
    """What `run_steps` did.

    Attributes:
        step: the last step taken (`start` when none was).
        losses: the next-token loss of every step taken, in order.
        stopped: `should_stop`'s reason when it ended the loop early, else None.
        timed_seconds: the time of the steps after the first (which includes tracing
            and compilation).
        timed_steps: how many steps `timed_seconds` covers.
    """

    step: int
    losses: list[float] = dataclasses.field(default_factory=list)
    stopped: str | None = None
    timed_seconds: float = 0.0
    timed_steps: int = 0


def check_finite(out: dict, step: int) -> None:
    """Raises `NonFiniteLoss` when the step's `loss` or `extra_loss` is inf or NaN."""
    for key, name in (("loss", "loss"), ("extra_loss", "extra loss")):
        if key in out and not math.isfinite(float(out[key])):
            raise NonFiniteLoss(name, float(out[key]), step)


def run_steps(
    step_fn: Callable,
    batches: Iterable,
    *,
    steps: int,
    start: int = 0,
    on_step: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[int], str | None] | None = None,
    stop_on_nonfinite: bool = True,
) -> LoopResult:
    """Runs `step_fn` on `batches` for steps `start + 1 ... steps`.

    Args:
        step_fn: `fn(inputs, targets, weights) -> dict` with at least `loss`
            (`training.step.make_train_step`).
        batches: an iterable (or iterator) of `(inputs, targets, weights)`; unreadable
            data, or too few batches, is a one-line `DataError`.
        steps: the last step.
        start: the steps already taken (a resumed run's step).
        on_step: `fn(step, out)` after each step (logging, evaluation, checkpoints).
        should_stop: `fn(step) -> reason or None` after `on_step`; a reason ends the loop.
        stop_on_nonfinite: a non-finite `loss` or `extra_loss` raises `NonFiniteLoss`
            (False: the caller judges, e.g. a federated round rejects the update).

    Returns:
        A `LoopResult`.

    Examples:
        result = run_steps(step, dataset, steps=100, on_step=lambda s, out: print(s))
        result.losses[-1]
    """
    iterator = iter(batches)
    result = LoopResult(step=start)
    for step in range(start + 1, steps + 1):
        try:
            inputs, targets, weights = next_batch(iterator)
        except StopIteration:
            raise DataError(
                f"the training data ended after {step - 1 - start} batches, before step "
                f"{step} of {steps}"
            ) from None
        started = time.perf_counter()
        out = step_fn(inputs, targets, weights)
        loss = float(out["loss"])  # waits for the step
        elapsed = time.perf_counter() - started
        result.step = step
        if step > start + 1:  # the first step includes compilation
            result.timed_seconds += elapsed
            result.timed_steps += 1
        if stop_on_nonfinite:
            check_finite(out, step)
        result.losses.append(loss)
        if on_step is not None:
            on_step(step, out)
        reason = should_stop(step) if should_stop is not None else None
        if reason:
            result.stopped = reason
            break
    return result
