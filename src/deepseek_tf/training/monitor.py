"""TrainingMonitor: the brief's five training signals, as a Keras callback."""

from __future__ import annotations

import collections
import time

import keras
import numpy as np
import psutil
import tensorflow as tf


def memory_in_use_mb(on_gpu: bool | None = None) -> float:
    """Accelerator memory in use when there is a GPU, else the process RSS (MiB)."""
    if on_gpu is None:
        on_gpu = bool(tf.config.list_logical_devices("GPU"))
    if on_gpu:
        info = tf.config.experimental.get_memory_info("GPU:0")
        return info["current"] / 2**20
    return psutil.Process().memory_info().rss / 2**20


def balance_stats(expert_load: np.ndarray) -> dict:
    """Load-balance summary of `(n_moe_layers, n_experts)` routed-token fractions.

    `load_max_mean` is the worst layer's max/mean expert load (1.0 is perfect
    balance); `load_min_mean` its least-used expert's share relative to the mean.
    """
    mean = expert_load.mean(axis=-1, keepdims=True)
    ratio = expert_load / np.maximum(mean, 1e-12)
    return {
        "load_max_mean": float(ratio.max(axis=-1).max()),
        "load_min_mean": float(ratio.min(axis=-1).min()),
    }


class TrainingMonitor(keras.callbacks.Callback):
    """Logs gradient norm, activation sparsity, memory, throughput, loss variance.

    The training step reports `loss`, `grad_norm`, `activation_sparsity` and
    `tokens` (tokens in the step) in the batch logs; this callback adds
    `tokens_per_sec` (since the previous batch end), `memory_mb` and
    `loss_variance` (over the last `window` steps) to the same logs, keeps
    their history in `self.history`, and writes them to TensorBoard when a
    summary writer is given.

    Args:
        window: number of recent steps the loss variance is computed over.
        summary_writer: optional `tf.summary` writer.
        every: write to TensorBoard every this many steps.

    Examples:
    >>> monitor = TrainingMonitor(window=50)
    """

    SIGNALS = (
        "grad_norm",
        "activation_sparsity",
        "memory_mb",
        "tokens_per_sec",
        "loss_variance",
        "load_max_mean",
        "load_min_mean",
        "mtp_loss",
        "aux_loss",
    )

    def __init__(self, window: int = 50, summary_writer=None, every: int = 10):
        super().__init__()
        self.window = window
        self.summary_writer = summary_writer
        self.every = every
        self.history = {name: [] for name in self.SIGNALS}
        self._losses = collections.deque(maxlen=window)
        self._last_time = None
        self._on_gpu = None

    def on_train_begin(self, logs=None):
        self._on_gpu = bool(tf.config.list_logical_devices("GPU"))  # once, not per step
        self._last_time = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs if logs is not None else {}
        now = time.perf_counter()
        elapsed = max(now - (self._last_time or now), 1e-9)
        self._last_time = now
        self._losses.append(float(logs["loss"]))
        logs["tokens_per_sec"] = float(logs.get("tokens", 0)) / elapsed
        logs["memory_mb"] = memory_in_use_mb(self._on_gpu)
        logs["loss_variance"] = float(np.var(self._losses)) if len(self._losses) > 1 else 0.0
        for name in self.SIGNALS:
            if name in logs:
                self.history[name].append(float(logs[name]))
        step = int(logs.get("step", batch))
        if self.summary_writer is not None and step % self.every == 0:
            with self.summary_writer.as_default(step=step):
                for name in self.SIGNALS:
                    if name in logs:
                        tf.summary.scalar(f"monitor/{name}", logs[name])

    def get_config(self):
        return {"window": self.window, "every": self.every}
