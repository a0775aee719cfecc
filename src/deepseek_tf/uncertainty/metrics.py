"""Calibration and selective-prediction metrics over per-token predictions.

Everything is computed from the predictive distribution `p` of each token (the mean of
the model's sampled softmaxes) and its target:

- per token (`token_stats`, in TensorFlow with TFP's Brier score): negative
  log-likelihood, top-1 confidence and correctness, predictive entropy `H[p]`, expected
  entropy `E_s H[p_s]` (aleatoric) and mutual information `H[p] - E_s H[p_s]` (epistemic,
  0 for a single sample), and the Brier score `sum_i (p_i - y_i)^2` (between 0 and 2);
- over all tokens (`summarise`, NumPy): expected calibration error over 15 equal-width
  confidence bins (`tfp.stats.find_bins`), AUROC of an uncertainty score for telling wrong
  top-1 predictions from right ones, the risk-coverage curve and its area (AURC), and
  accuracy at a given coverage (selective prediction).
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

ECE_BINS = 15
TINY = 1e-30


@functools.cache
def _tfp_stats():
    """`tfp.stats`, imported on first use: TensorFlow Probability adds about 1.5 s to every
    process start (the API imports this module for `calibrate`)."""
    import tensorflow_probability as tfp

    return tfp.stats


def entropy(probs):
    """`-sum p log p` over the last axis (0 log 0 = 0)."""
    return -tf.reduce_sum(probs * tf.math.log(tf.maximum(probs, TINY)), axis=-1)


def token_stats(sample_probs, targets) -> dict:
    """Per-token statistics of `(S, B, T, V)` sampled probabilities against `(B, T)` ids.

    Returns `(B, T)` tensors: `nll`, `confidence`, `correct`, `entropy` (predictive),
    `expected_entropy`, `mutual_information`, `brier`.
    """
    sample_probs = tf.cast(sample_probs, tf.float32)
    mean = tf.reduce_mean(sample_probs, axis=0)  # (B, T, V) the predictive distribution
    targets = tf.cast(targets, tf.int32)
    log_mean = tf.math.log(tf.maximum(mean, TINY))
    total = entropy(mean)  # (B, T)
    expected = tf.reduce_mean(entropy(sample_probs), axis=0)  # (B, T)
    return {
        "nll": -tf.gather(log_mean, targets, axis=-1, batch_dims=2),
        "confidence": tf.reduce_max(mean, axis=-1),
        "correct": tf.cast(tf.argmax(mean, axis=-1, output_type=tf.int32) == targets, tf.float32),
        "entropy": total,
        "expected_entropy": expected,
        "mutual_information": tf.maximum(total - expected, 0.0),  # >= 0 (Jensen)
        "brier": brier(log_mean, targets),
    }


def brier(log_probs, targets):
    """The standard Brier score `sum_i (p_i - y_i)^2` (between 0 and 2) per position.

    TFP's `brier_score` is `sum p^2 - 2 p_y` (the standard one minus the 1 of the one-hot)
    and takes its softmax over axis 1, which is only the class axis for 2-D logits: the
    positions are flattened first.
    """
    vocab = tf.shape(log_probs)[-1]
    flat = _tfp_stats().brier_score(tf.reshape(targets, [-1]), tf.reshape(log_probs, [-1, vocab]))
    return tf.reshape(flat, tf.shape(targets)) + 1.0


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
    """`sum_b n_b / N * |accuracy_b - confidence_b|` over equal-width confidence bins."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = _tfp_stats().find_bins(confidence, edges, dtype=tf.int64).numpy()  # 1.0: last bin
    gap = np.bincount(index, correct - confidence, minlength=bins)  # per bin: sum (acc - conf)
    return float(np.abs(gap).sum() / max(len(confidence), 1))


def reliability_bins(confidence, correct, bins: int = ECE_BINS) -> dict:
    """Per bin: `count`, mean `confidence` and `accuracy` (NaN for empty bins)."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = _tfp_stats().find_bins(confidence, edges, dtype=tf.int64).numpy()
    count = np.bincount(index, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": edges.tolist(),
            "count": count.tolist(),
            "confidence": (np.bincount(index, confidence, minlength=bins) / count).tolist(),
            "accuracy": (np.bincount(index, correct, minlength=bins) / count).tolist(),
        }


def auroc(scores, positives) -> float:
    """Area under the ROC curve of `scores` for telling `positives` (True) from the rest:
    the probability that a random positive scores above a random negative (ties count
    half), from average ranks (Mann-Whitney U)."""
    scores = np.asarray(scores, np.float64)
    positives = np.asarray(positives, bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average rank over each run of ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def risk_coverage(uncertainty, correct) -> tuple[np.ndarray, np.ndarray]:
    """`(coverage, risk)`: keeping the `k` most certain tokens (`k = 1..N`), the fraction
    kept and their error rate."""
    order = np.argsort(np.asarray(uncertainty, np.float64), kind="mergesort")
    errors = 1.0 - np.asarray(correct, np.float64)[order]
    kept = np.arange(1, len(errors) + 1)
    return kept / len(errors), np.cumsum(errors) / kept


def summarise(stats: dict, uncertainty_key: str = "entropy") -> dict:
    """The campaign of numbers over concatenated per-token arrays (`token_stats`' keys)."""
    correct = np.asarray(stats["correct"], np.float64)
    uncertainty = np.asarray(stats[uncertainty_key], np.float64)
    coverage, risk = risk_coverage(uncertainty, correct)
    half = max(int(round(0.5 * len(correct))), 1)
    return {
        "tokens": int(len(correct)),
        "nll": float(np.mean(stats["nll"])),
        "accuracy": float(correct.mean()),
        "ece": expected_calibration_error(stats["confidence"], correct),
        "brier": float(np.mean(stats["brier"])),
        "entropy": float(np.mean(stats["entropy"])),
        "expected_entropy": float(np.mean(stats["expected_entropy"])),
        "mutual_information": float(np.mean(stats["mutual_information"])),
        "auroc_error_detection": auroc(uncertainty, correct < 0.5),
        "aurc": float(np.mean(risk)),
        "accuracy_at_50_coverage": float(1.0 - risk[half - 1]),
        "uncertainty_score": uncertainty_key,
        "curve": {"coverage": coverage, "risk": risk},
    }
