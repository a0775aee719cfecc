"""What a training run records, and where: one object for the trainer to call.

`metrics.jsonl` (the chief's), TensorBoard's `logs/`, the trackers of `train.loggers`,
the progress output and the five training signals (`monitor.TrainingMonitor`). The train
loss shown is the mean of the last `train.log_every` steps (`training.report`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from deepseek_tf.config.schema import Config
from deepseek_tf.run_layout import NoMetrics, RunLayout
from deepseek_tf.training.monitor import TrainingMonitor, balance_stats
from deepseek_tf.training.report import Progress, best_validation, eval_line, write_loss_curves
from deepseek_tf.training.tracking import Trackers


class RunRecorder:
    """Records one training session of `run`.

    Args:
        run: the run directory.
        config: the run's config (`train.log_every`, `monitor_window`, `loggers`).
        chief: only the chief writes files; the other workers record nothing.
        verbose: 0 prints nothing (see `report.Progress`).

    Call `open()` once the run directory may be written, `begin(model)` before the
    first step, `close(...)` after the last.

    Examples:
        record = RunRecorder(run, config, chief=True, verbose=1)
        record.open(); record.begin(model, tokens_per_step=4096)
        record.step(1, out, learning_rate=lambda: 1e-3)
        record.close(checkpoint="runs/x/checkpoints/ckpt-1", done=True)
    """

    def __init__(self, run: RunLayout, config: Config, *, chief: bool, verbose=1):
        t = config.train
        self.run, self.config, self.chief = run, config, chief
        self.progress = Progress(t.steps, t.log_every, verbose)
        self.metrics = run.metrics if chief else NoMetrics()
        self.writer = self.trackers = self.monitor = None
        self.recent_losses = collections.deque(maxlen=t.log_every)  # the loss shown
        self.tokens_per_step = 0

    def log(self, message: str) -> None:
        """A log line of its own, never glued to the progress bar."""
        self.progress.message(message)

    def open(self) -> None:
        """The TensorBoard writer and the trackers (files of the run directory)."""
        if self.chief:
            self.writer = tf.summary.create_file_writer(str(self.run.logs_dir))
        else:
            self.writer = tf.summary.create_noop_writer()
        if self.chief and self.config.train.loggers:
            self.trackers = Trackers(self.run, self.config, log=self.log)

    def begin(self, model, tokens_per_step: int) -> None:
        """Starts the training signals' clock (before the first step)."""
        t = self.config.train
        self.tokens_per_step = tokens_per_step
        self.monitor = TrainingMonitor(t.monitor_window, self.writer, every=t.log_every)
        self.monitor.set_model(model)
        self.monitor.on_train_begin()

    def step(self, step: int, out: dict, learning_rate: Callable[[], float]) -> None:
        """After step `step` (`out`: its statistics): the signals; on a log step (every
        `train.log_every` and the last) `metrics.jsonl`, trackers, TensorBoard, progress."""
        t = self.config.train
        self.recent_losses.append(float(out["loss"]))
        load = out.pop("expert_load", None)
        logs = {k: float(v) for k, v in out.items()}
        logs.update(step=step, tokens=self.tokens_per_step)
        if load is not None:
            logs.update(balance_stats(load.numpy()))
        self.monitor.on_train_batch_end(step, logs)  # adds its signals to logs
        if step % t.log_every and step != t.steps:
            return
        logs["lr"] = learning_rate()
        logs["loss_avg"] = float(np.mean(self.recent_losses))
        logs["loss_avg_steps"] = len(self.recent_losses)
        if load is not None:
            logs["expert_load"] = np.round(load.numpy(), 4).tolist()
        self.metrics.write(**logs)
        if self.trackers is not None:
            self.trackers.log(step, logs)
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", logs["loss"])
            tf.summary.scalar("train/learning_rate", logs["lr"])
        self.progress.step(step, logs)

    def evaluation(self, step: int, result: dict) -> None:
        """A validation result (`training.evaluate.evaluate`) at `step`."""
        entry = {"step": step, "val_loss": result["loss"], "val_perplexity": result["perplexity"]}
        self.metrics.write(**entry, time=round(time.time(), 3))  # wall clock: time-to-loss
        if self.trackers is not None:
            self.trackers.log(step, entry)
        with self.writer.as_default(step=step):
            tf.summary.scalar("val/loss", result["loss"])
            tf.summary.scalar("val/perplexity", result["perplexity"])
        losses = self.recent_losses
        self.log(eval_line(step, result, np.mean(losses), len(losses)))

    def checkpoint(self, step: int, path: str, seconds: float) -> None:
        """A checkpoint written at `step` in `seconds`."""
        self.metrics.write(step=step, event="checkpoint", path=path, seconds=round(seconds, 3))

    def best(self, step: int, val_loss: float, path: str, seconds: float) -> None:
        """The weights of `step` saved as the best so far (`train.keep_best`)."""
        self.metrics.write(step=step, event="best", best_val_loss=val_loss, path=path,
                           seconds=round(seconds, 3))  # fmt: skip
        self.log(f"step {step}: best validation so far, weights kept in {path}")

    def close(self, checkpoint: str | None, done: bool) -> None:
        """Ends the session's output; the trackers get the checkpoint of a finished run."""
        if self.monitor is not None:
            self.monitor.on_train_end()
        self.progress.close()
        if self.writer is not None:
            self.writer.flush()
        if self.trackers is not None:
            self.trackers.finish(checkpoint if done else None)

    def summary(self, summary: dict) -> dict:
        """Writes the summary to `metrics.jsonl`; returns it with the run's best validation
        (from the metrics unless `summary` gives it: the kept best weights') and the loss
        curves (a plot that fails is a log line, never a failed run)."""
        t = self.config.train
        self.metrics.write(event="summary", **summary)
        summary = {**summary, "steps": t.steps, "run_dir": str(self.run.path), "loss_curves": None}
        best = best_validation(self.metrics.read())
        summary = {"best_val_loss": best and best[0], "best_val_step": best and best[1], **summary}
        if self.chief:
            try:
                path = write_loss_curves(self.run, t.log_every)
                summary["loss_curves"] = str(path) if path else None
            except Exception as e:  # noqa: BLE001 - a plot never fails a finished run
                self.log(f"[train] could not write the loss curves: {e}")
        return summary
