"""`--batch-size auto`: the largest batch whose training step fits a memory budget.

The brief advises adjusting batch size and sequence length to the hardware. A CPU
does not raise an out-of-memory error the way a GPU does (the OS kills the process
instead), so instead of trying batches until one fails, this measures what a step
*adds* to memory at two small batch sizes, fits `peak(b) = fixed + per_sequence * b`,
picks the largest batch (a multiple of the replica count) whose prediction fits the
budget, and then runs one step at that batch to confirm; a step over the budget is
refitted through the largest batch known to fit (`_refit`) until one fits.

Step memory is TensorFlow's allocator peak during one compiled step over what was
allocated before it (`tf.config.experimental.get_memory_info` after
`reset_memory_stats`, on the GPU or on the CPU). Process RSS would not do: after the
first step the allocator reuses its memory, so later steps barely move the RSS peak.
"""

from __future__ import annotations

import gc

import numpy as np
import psutil
import tensorflow as tf

from deepseek_tf.config.loader import update_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.optim import make_optimizer
from deepseek_tf.training.step import make_train_step

MIB = 2**20


def _device() -> str:
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


# TensorFlow's default CPU allocator keeps statistics only where oneDNN is on by default
# (Intel CPUs); elsewhere (AMD) `get_memory_info("CPU:0")` raises. TensorFlow's BFC
# allocator always keeps them, chosen by this variable before TensorFlow starts.
BFC_VARIABLE = "TF_CPU_ALLOCATOR_USE_BFC"


def check_memory_stats() -> None:
    """Raises a one-line `ConfigError` when this process's allocator keeps no statistics."""
    try:
        tf.config.experimental.get_memory_info(_device())
    except ValueError:
        raise ConfigError(
            f"--batch-size auto: TensorFlow keeps no memory statistics for {_device()} in this "
            f"process; start it with {BFC_VARIABLE}=true (`deepseek-tf train --batch-size auto` "
            "does so itself)"
        ) from None


def _reset_peak() -> None:
    tf.config.experimental.reset_memory_stats(_device())


def _peak_bytes() -> int:
    return int(tf.config.experimental.get_memory_info(_device())["peak"])


def _current_bytes() -> int:
    return int(tf.config.experimental.get_memory_info(_device())["current"])


def default_budget_bytes() -> int:
    """80% of the GPU's memory, or of the memory available now on a CPU-only machine."""
    if _device() == "GPU:0":
        details = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0]
        )
        total = details.get("memory_limit") or 0
        if total:
            return int(0.8 * total)
    return int(0.8 * psutil.virtual_memory().available)


def step_bytes(config, vocab_size: int, batch: int) -> int:
    """What one compiled training step at `batch` adds to memory (steady state)."""
    check_memory_stats()
    config = update_config(config, train={"batch_size": batch})
    t = config.train
    model = build_model(config, vocab_size, seed=t.seed)
    optimizer = make_optimizer(t, model)
    step = make_train_step(
        model,
        optimizer,
        accumulation=1,
        replicas=1,
        sparsity_threshold=t.sparsity_threshold,
        jit_compile=config.runtime.jit_compile,
        mtp_loss_weight=config.model.mtp_loss_weight,
        clip_norm=t.clip_norm,
    )
    seq = config.data.packed_length()
    ids = np.random.RandomState(0).randint(0, vocab_size, (batch, seq + 1)).astype("int32")
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T) each
    weights = np.ones(inputs.shape, "float32")
    float(step(inputs, targets, weights)["loss"])  # trace + compile: not a training step's cost
    base = _current_bytes()
    _reset_peak()
    float(step(inputs, targets, weights)["loss"])
    used = max(_peak_bytes() - base, 0)
    del model, optimizer, step
    gc.collect()
    return used


def _slope(low: tuple[int, float], high: tuple[int, float]) -> float:
    """Bytes per sequence on the line through two `(batch, bytes)` measurements."""
    return max((high[1] - low[1]) / max(high[0] - low[0], 1), 1.0)


def _refit(fits: tuple[int, float], over: tuple[int, float], budget: float, replicas: int) -> int:
    """The next batch to try after `over` = (batch, bytes) exceeded the budget: the line
    through it and `fits`, the largest batch known to fit (`(0, 0)`: none), read at the
    budget; below `over`'s batch and at least `fits`'. Small probes' memory is mostly
    allocator rounding, so a line through them alone can be far off: for a tiny model
    it measured ~0 per sequence, and halving from the largest batch then took four more
    probes to settle on 512 sequences where ~650 fit."""
    batch = fits[0] + int((budget - fits[1]) // _slope(fits, over))
    batch = min(batch // replicas * replicas, over[0] - replicas)
    return max(batch, fits[0], replicas)


def find_batch_size(
    config,
    vocab_size: int,
    budget_bytes: int | None = None,
    *,
    replicas: int = 1,
    max_batch: int = 4096,
    log=print,
) -> dict:
    """Largest global batch (multiple of `replicas`) whose step fits `budget_bytes`.

    Returns `{"batch_size", "seq_len", "budget_mib", "fixed_mib", "per_sequence_mib",
    "confirmed_step_mib"}`.
    """
    check_memory_stats()
    budget = budget_bytes or default_budget_bytes()
    small = (2 * replicas, 8 * replicas)  # two probes; the difference is per-sequence memory
    measured = [step_bytes(config, vocab_size, b) for b in small]
    per_seq = _slope(*zip(small, measured))
    fixed = max(measured[0] - per_seq * small[0], 0.0)
    batch = int((budget - fixed) // per_seq) // replicas * replicas
    batch = min(batch, max_batch // replicas * replicas)
    if batch < replicas:
        raise ConfigError(
            f"--batch-size auto: even {replicas} sequence(s) of {config.data.packed_length()} "
            f"tokens need ~{measured[0] / MIB:.0f} MiB, over the {budget / MIB:.0f} MiB budget; "
            "lower data.seq_len or the model size"
        )
    known = [(b, m) for b, m in zip(small, measured) if m <= budget]
    fits = known[-1] if known else (0, 0.0)  # the largest batch known to fit
    while True:  # (a refit that falls back to `fits` reuses its measurement)
        used = fits[1] if batch == fits[0] else step_bytes(config, vocab_size, batch)
        if log:
            log(
                f"[batch-size auto] batch {batch}: step adds {used / MIB:.0f} MiB "
                f"(budget {budget / MIB:.0f} MiB)"
            )
        if used <= budget or batch <= max(fits[0], replicas):
            break
        per_seq = _slope(fits, (batch, used))  # what is reported
        batch = _refit(fits, (batch, used), budget, replicas)
    return {
        "batch_size": batch,
        "seq_len": config.data.packed_length(),
        "budget_mib": round(budget / MIB, 1),
        "fixed_mib": round(fixed / MIB, 1),
        "per_sequence_mib": round(per_seq / MIB, 3),
        "confirmed_step_mib": round(used / MIB, 1),
    }
