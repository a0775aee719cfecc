"""The uncertainty metrics against independent NumPy implementations."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from deepseek_tf.uncertainty.metrics import (
    auroc,
    expected_calibration_error,
    risk_coverage,
    summarise,
    token_stats,
)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 50, 7)) * rng.uniform(0.5, 4.0, size=(3, 4, 50, 1))
    targets = rng.integers(0, 7, size=(4, 50))
    return _softmax(logits), targets  # (S, B, T, V), (B, T)


def test_token_stats_match_numpy(case):
    probs, targets = case
    got = {k: np.asarray(v) for k, v in token_stats(probs, targets).items()}
    mean = probs.mean(0)  # (B, T, V)
    onehot = np.eye(7)[targets]
    np.testing.assert_allclose(got["brier"], ((mean - onehot) ** 2).sum(-1), rtol=1e-5)
    assert got["brier"].min() >= 0 and got["brier"].max() <= 2
    picked = np.take_along_axis(mean, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got["nll"], -np.log(picked), rtol=1e-5)
    h = -(mean * np.log(mean)).sum(-1)
    expected = (-(probs * np.log(probs)).sum(-1)).mean(0)
    np.testing.assert_allclose(got["entropy"], h, rtol=1e-5)
    np.testing.assert_allclose(got["mutual_information"], h - expected, atol=1e-5)
    assert got["mutual_information"].min() >= 0
    np.testing.assert_array_equal(got["correct"], mean.argmax(-1) == targets)


def test_one_sample_has_no_mutual_information(case):
    probs, targets = case
    mi = np.asarray(token_stats(probs[:1], targets)["mutual_information"])
    assert np.all(mi == 0.0)


def _ece_numpy(confidence, correct, bins=15):
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(confidence)


def test_ece_matches_numpy_and_tfp(case):
    probs, targets = case
    mean = probs[0].reshape(-1, 7)
    confidence, correct = mean.max(-1), mean.argmax(-1) == targets.reshape(-1)
    ours = expected_calibration_error(confidence, correct)
    assert ours == pytest.approx(_ece_numpy(confidence, correct), abs=1e-9)
    logits = np.log(mean).astype(np.float32)
    reference = tfp.stats.expected_calibration_error(
        15, logits=logits, labels_true=targets.reshape(-1).astype(np.int32)
    )
    assert ours == pytest.approx(float(reference), abs=1e-5)
    perfect = np.r_[np.ones(10), np.zeros(10)], np.r_[np.ones(10), np.zeros(10)]
    assert expected_calibration_error(*perfect) == 0.0


def _auroc_pairs(scores, positives):
    pos, neg = scores[positives], scores[~positives]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def test_auroc_matches_pairwise_counting():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=400), 1)  # with ties
    positives = rng.random(400) < 0.3 + 0.2 * (scores > 0)
    assert auroc(scores, positives) == pytest.approx(_auroc_pairs(scores, positives), abs=1e-12)
    assert auroc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert np.isnan(auroc([1.0, 2.0], [True, True]))


def test_risk_coverage_and_summary(case):
    probs, targets = case
    coverage, risk = risk_coverage([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0])
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.0, 1 / 3, 0.5])
    stats = {k: np.asarray(v).reshape(-1) for k, v in token_stats(probs, targets).items()}
    summary = summarise(stats)
    assert summary["tokens"] == 200 and 0 <= summary["ece"] <= 1
    assert summary["accuracy_at_50_coverage"] >= summary["accuracy"] - 0.2
    assert summary["aurc"] == pytest.approx(np.mean(summary["curve"]["risk"]))


def test_tf_graph_mode(case):
    probs, targets = case
    compiled = tf.function(token_stats)
    np.testing.assert_allclose(
        compiled(probs, targets)["brier"], token_stats(probs, targets)["brier"], rtol=1e-6
    )
