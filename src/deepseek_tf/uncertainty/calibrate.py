"""Temperature scaling (Guo et al., 2017), fitted on the validation split.

One scalar `t` divides every logit; it is chosen to minimise the negative log-likelihood
of held-out tokens, which leaves the top-1 prediction unchanged and fixes most of a
network's over- or under-confidence. `calibrate(RUN, out=NEW)` (`deepseek-tf calibrate
RUN --out NEW`) fits `t` on
the first half of the validation blocks, reports NLL and ECE before and after on the
second half (tokens the fit never saw), and writes a new run whose
`calibration.logit_temperature` is the old one times `t` -- so `eval`, `generate`, `serve` and
the exported models all use the calibrated probabilities.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from deepseek_tf.config.loader import update_config
from deepseek_tf.data.pipeline import make_eval_dataset
from deepseek_tf.errors import InputError, RunDirError, check_count
from deepseek_tf.rundir import RunDir, load_run
from deepseek_tf.uncertainty.metrics import expected_calibration_error

MAX_VALUES = 1 << 24  # logits kept for the fit (64 MiB of float32); tokens are subsampled
LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def _nll(logits, targets, t: float) -> float:
    """Mean negative log-likelihood of `(S, N, V)` sampled logits divided by `t`."""
    scaled = logits / t
    scaled = scaled - scaled.max(-1, keepdims=True)
    log_probs = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))  # (S, N, V)
    chosen = np.take_along_axis(log_probs, targets[None, :, None], -1)[..., 0]  # (S, N)
    # the predictive distribution is the mean over samples of the softmaxes
    top = chosen.max(0)
    return float(-(top + np.log(np.exp(chosen - top).mean(0))).mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, iterations: int = 60) -> float:
    """The `t` minimising `_nll` (golden-section search over log t in [0.05, 20])."""
    golden = (math.sqrt(5) - 1) / 2
    lo, hi = LOG_T_RANGE
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = _nll(logits, targets, math.exp(a)), _nll(logits, targets, math.exp(b))
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = _nll(logits, targets, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = _nll(logits, targets, math.exp(b))
    return math.exp((lo + hi) / 2)


def validation_logits(model, config, tokenizer, samples: int = 1, seed: int = 0,
                      max_batches: int = 0):  # fmt: skip
    """`(S, N, V)` logits and `(N,)` targets of the validation split's tokens (its first
    `max_batches` batches; 0: all), halved: `(fit part, held-out part)` by block -- even
    blocks to fit, odd blocks held out, so both halves come from the same text (the
    split's first and second halves are different plays) -- tokens subsampled to at most
    `MAX_VALUES`."""
    ds = make_eval_dataset(config.data, tokenizer, config.train.batch_size, split="val")
    if max_batches:
        ds = ds.take(max_batches)

    @tf.function(reduce_retracing=True, autograph=False)
    def sampled(inputs, index):
        hidden = model.hidden_states(inputs, training=False)
        key = tf.stack([tf.constant(seed, tf.int32), index])
        return model.sample_logits(hidden, samples, key)[0]  # (S, B, T, V)

    blocks = sum(int(x.shape[0]) for x, _, _ in ds)
    if blocks < 2:
        raise InputError("calibration needs at least two validation blocks")
    vocab = model.vocab_size
    rate = min(1.0, 2 * MAX_VALUES / (blocks * config.data.seq_len * samples * vocab))
    rng = np.random.default_rng(seed)
    halves = [([], []), ([], [])]  # even blocks to fit, odd blocks held out
    first = 0
    for i, (inputs, targets, _) in enumerate(ds):
        logits = np.asarray(sampled(inputs, tf.constant(i)))  # (S, B, T, V)
        targets = np.asarray(targets)  # (B, T)
        for row in range(targets.shape[0]):
            keep = rng.random(targets.shape[1]) < rate  # a token subsample, bounded memory
            part = halves[(first + row) % 2]
            part[0].append(logits[:, row, keep].astype(np.float64))  # (S, n, V)
            part[1].append(targets[row, keep])
        first += targets.shape[0]
    return [(np.concatenate(lg, axis=1), np.concatenate(tg)) for lg, tg in halves]


def _ece(logits, targets, t: float) -> float:
    scaled = logits / t
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).mean(0)  # (N, V)
    return expected_calibration_error(probs.max(-1), probs.argmax(-1) == targets)


def _check_out(run_dir, out) -> Path:
    """Refuses to write over the source run, an existing file or another run's checkpoints."""
    if Path(out).resolve() == Path(run_dir).resolve():
        raise RunDirError(f"--out {out} is the source run; choose a new directory")
    RunDir(out).check_new()
    return Path(out)


def calibrate(run_dir, *, out, samples: int = 8, max_batches: int = 0) -> dict:
    """Fits a logit temperature on `run_dir`'s validation split and writes the calibrated
    run to `out` (`deepseek-tf calibrate RUN_DIR --out OUT`).

    Args:
        run_dir: the run to calibrate (it needs a tokenizer: its validation split is read).
        out: the new run directory (not the source, not a run with checkpoints).
        samples: latent samples per token of a gaussian head (other heads take one).
        max_batches: validation batches read (0: the whole split).

    Returns:
        The record appended to `out`'s `compression.json`: `method` ("calibrate"),
        `temperature_factor` (t), `logit_temperature` (the new run's), `fit_tokens`,
        `held_out_tokens`, `held_out_nll_before`/`_after`, `held_out_ece_before`/`_after`,
        `seconds`.

    Raises:
        InputError: `samples` below 1, `max_batches` below 0, a run without tokenizer or
            with fewer than two validation blocks.
        RunDirError: `out` is the source run or holds another run's checkpoints.

    Examples:

    >>> record = calibrate("runs/tiny", out="runs/tiny-calibrated")  # doctest: +SKIP
    >>> record["held_out_nll_after"] < record["held_out_nll_before"]  # doctest: +SKIP
    True
    """
    check_count("samples", samples, 1)
    check_count("max-batches", max_batches, 0, "(0: all)")
    out = _check_out(run_dir, out)
    config = RunDir(run_dir).read_config()
    model, tokenizer = load_run(run_dir)
    if tokenizer is None:
        raise InputError(f"{run_dir} has no tokenizer: its validation split cannot be read")
    started = time.perf_counter()
    samples = samples if model.gaussian_head is not None else 1
    (fit_logits, fit_targets), (held_logits, held_targets) = validation_logits(
        model, config, tokenizer, samples, max_batches=max_batches
    )
    t = fit_temperature(fit_logits, fit_targets)
    temperature = config.calibration.logit_temperature * t
    record = {
        "method": "calibrate",
        "options": {"samples": samples, "max_batches": max_batches},
        "temperature_factor": t,
        "logit_temperature": temperature,
        "fit_tokens": int(len(fit_targets)),
        "held_out_tokens": int(len(held_targets)),
        "held_out_nll_before": _nll(held_logits, held_targets, 1.0),
        "held_out_nll_after": _nll(held_logits, held_targets, t),
        "held_out_ece_before": _ece(held_logits, held_targets, 1.0),
        "held_out_ece_after": _ece(held_logits, held_targets, t),
        "seconds": round(time.perf_counter() - started, 3),
    }
    model.logit_temperature = temperature
    entry = {"source": str(run_dir), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    history = RunDir(run_dir).read_history() + [entry]
    new_config = update_config(config, calibration={"logit_temperature": temperature})
    RunDir(out).write_weights_run(new_config, tokenizer, model, history)
    return record
