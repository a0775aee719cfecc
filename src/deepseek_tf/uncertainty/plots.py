"""`eval --uncertainty --plot DIR`: a reliability diagram and a risk-coverage curve (PNG).

Matplotlib with its non-interactive Agg backend (no display needed), loaded when the
first plot is drawn: importing this module (as `eval` does) stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepseek_tf.uncertainty.metrics import reliability_bins


def _pyplot():
    """`matplotlib.pyplot` on the Agg backend (imported on first use: it is heavy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(confidence, correct, path, title: str = "") -> Path:
    """Accuracy against confidence per confidence bin, with the bins' token counts."""
    plt = _pyplot()
    bins = reliability_bins(confidence, correct)
    edges = np.asarray(bins["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    accuracy = np.nan_to_num(np.asarray(bins["accuracy"]))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(centres, accuracy, width=width * 0.95, color="#4477aa", label="accuracy")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    gap = np.nan_to_num(np.asarray(bins["confidence"])) - accuracy
    top.bar(centres, gap, bottom=accuracy, width=width * 0.95, color="#ee6677", alpha=0.5,
            label="gap to confidence")  # fmt: skip
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or "reliability diagram")
    bottom.bar(centres, bins["count"], width=width * 0.95, color="#888888")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def risk_coverage_plot(coverage, risk, path, title: str = "") -> Path:
    """Error rate of the most certain tokens against the fraction of tokens kept."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(coverage, risk, color="#4477aa")
    ax.axhline(risk[-1], color="k", ls="--", lw=1, label="error at full coverage")
    ax.set_xlabel("coverage (fraction of tokens kept, most certain first)")
    ax.set_ylabel("risk (top-1 error rate)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(float(np.max(risk)), 1e-3) * 1.05)
    ax.legend(fontsize=8)
    ax.set_title(title or f"risk-coverage (AURC {float(np.mean(risk)):.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
