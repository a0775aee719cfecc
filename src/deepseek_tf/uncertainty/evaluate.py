"""`eval --uncertainty`: calibration, selective prediction and out-of-distribution detection.

`uncertainty_summary` is the `"uncertainty"` entry of `evaluate`'s result. `collect` runs
a `Predictor` over a dataset of `(inputs, targets, weights)` blocks and keeps the
per-token statistics of `metrics.token_stats` (and, per block, their means);
`uncertainty_report` summarises them; `ood_report` compares blocks of in-domain data
with blocks of other text by a sequence-level uncertainty (the block's mean predictive
entropy, mutual information or negative log-likelihood) and reports each score's AUROC
for telling the other text apart (1.0: perfectly separated, 0.5: chance).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from deepseek_tf.data.corpus import read_texts
from deepseek_tf.uncertainty.metrics import auroc, summarise, token_stats
from deepseek_tf.uncertainty.plots import reliability_diagram, risk_coverage_plot
from deepseek_tf.uncertainty.predictive import Predictor

KEYS = (
    "nll",
    "confidence",
    "correct",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "brier",
)
SEQUENCE_SCORES = ("entropy", "mutual_information", "nll")


# one traced function for every call (a new one per call would retrace each time)
_token_stats = tf.function(token_stats, reduce_retracing=True, autograph=False)


def collect(predictor: Predictor, dataset, max_batches: int = 0) -> dict:
    """Per-token arrays (`KEYS`) over `dataset`, plus per-block means (`seq_<key>`)."""
    tokens = {key: [] for key in KEYS}
    blocks = {f"seq_{key}": [] for key in SEQUENCE_SCORES}
    for i, (inputs, targets, weights) in enumerate(dataset):
        if max_batches and i >= max_batches:
            break
        stats = _token_stats(predictor(inputs, i), targets)  # (B, T) each
        keep = np.asarray(weights) > 0  # (B, T)
        for key in KEYS:
            tokens[key].append(np.asarray(stats[key])[keep])
        for key in SEQUENCE_SCORES:
            value = np.asarray(stats[key])
            blocks[f"seq_{key}"].append((value * keep).sum(1) / np.maximum(keep.sum(1), 1))
    if not tokens["nll"]:
        raise ValueError("evaluation dataset is empty")
    return {key: np.concatenate(parts) for key, parts in {**tokens, **blocks}.items()}


def uncertainty_report(collected: dict, predictor: Predictor) -> dict:
    """The summary `eval --uncertainty` prints (see `metrics.summarise`)."""
    score = "mutual_information" if predictor.samples > 1 else "entropy"
    summary = summarise(collected, "entropy")
    summary["method"] = predictor.method
    summary["samples"] = predictor.samples
    if predictor.samples > 1:  # epistemic uncertainty as the error detector too
        summary["auroc_error_detection_mutual_information"] = auroc(
            collected[score], collected["correct"] < 0.5
        )
    else:
        summary["mutual_information"] = 0.0  # one sample: no epistemic part
    return summary


def ood_report(in_domain: dict, other: dict) -> dict:
    """AUROC of each sequence-level score for telling `other`'s blocks (positives) from
    `in_domain`'s, with the block counts."""
    report = {"blocks_in_domain": len(in_domain["seq_nll"]), "blocks_ood": len(other["seq_nll"])}
    for key in SEQUENCE_SCORES:
        scores = np.concatenate([in_domain[f"seq_{key}"], other[f"seq_{key}"]])
        positives = np.r_[np.zeros(len(in_domain[f"seq_{key}"])), np.ones(len(other[f"seq_{key}"]))]
        report[f"auroc_{key}"] = auroc(scores, positives > 0)
    return report


def known_text_files(files, tokenizer, scratch) -> list[str]:
    """`files` as the tokenizer can read them: copies in `scratch` without the characters
    it cannot encode (`eval --drop-unknown`); `files` unchanged for a tokenizer that reads
    any text (a byte-level one)."""
    if tokenizer.char_table is None:
        return list(files)
    out = []
    for i, text in enumerate(read_texts(files)):
        path = Path(scratch) / f"ood_{i}.txt"
        path.write_text(tokenizer.drop_unknown(text), encoding="utf-8")
        out.append(str(path))
    return out


def uncertainty_summary(
    predictor: Predictor, dataset, *, max_batches: int = 0, plot=None, title: str = "",
    ood_dataset=None,
) -> dict:  # fmt: skip
    """The `"uncertainty"` entry of `evaluate`'s result: `uncertainty_report` of `dataset`,
    with `"plots"` (the PNG paths written into the directory `plot`) and `"ood"` (the
    `ood_report` against the blocks of `ood_dataset`) when those are given."""
    collected = collect(predictor, dataset, max_batches)
    summary = uncertainty_report(collected, predictor)
    curve = summary.pop("curve")
    if plot is not None:
        directory = Path(plot)
        directory.mkdir(parents=True, exist_ok=True)
        summary["plots"] = [
            str(reliability_diagram(collected["confidence"], collected["correct"],
                                    directory / "reliability.png", title)),
            str(risk_coverage_plot(curve["coverage"], curve["risk"],
                                   directory / "risk_coverage.png")),
        ]  # fmt: skip
    if ood_dataset is not None:
        summary["ood"] = ood_report(collected, collect(predictor, ood_dataset, max_batches))
    return summary
