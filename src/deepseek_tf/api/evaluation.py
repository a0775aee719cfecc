"""Evaluating a run: `evaluate` (loss, perplexity, accuracy, and with `uncertainty=True`
calibration, selective prediction and OOD detection) and `calibrate` (temperature scaling).

`deepseek-tf eval` and `deepseek-tf calibrate` print what these return; their flags are
these functions' keywords (`--max-batches` -> `max_batches`).

Examples:

>>> from deepseek_tf.api.evaluation import evaluate, calibrate    # doctest: +SKIP
>>> evaluate("runs/shakespeare", max_batches=4)["loss"]            # doctest: +SKIP
1.7466
>>> evaluate("runs/shakespeare", uncertainty=True)["uncertainty"]["ece"]  # doctest: +SKIP
0.0123
>>> calibrate("runs/shakespeare", out="runs/calibrated")["temperature_factor"]  # doctest: +SKIP
1.08
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from deepseek_tf.data.corpus import resolve_files
from deepseek_tf.data.pipeline import make_eval_dataset
from deepseek_tf.errors import InputError, RunDirError, check_count
from deepseek_tf.generation.memory_bound import xla_prefill
from deepseek_tf.rundir import RunDir, load_run
from deepseek_tf.training.evaluate import evaluate as evaluate_model
from deepseek_tf.uncertainty.calibrate import calibrate
from deepseek_tf.uncertainty.evaluate import known_text_files, uncertainty_summary
from deepseek_tf.uncertainty.predictive import make_predictor

__all__ = ["calibrate", "evaluate"]

Paths = str | Path | Sequence[str | Path]


def _paths(value: Paths | None) -> list[str] | None:
    """A file pattern or a sequence of them as a list of strings (None stays None)."""
    if value is None:
        return None
    return [str(value)] if isinstance(value, (str, Path)) else [str(v) for v in value]


def _check_options(batch_size, max_batches, uncertainty, samples, mc_samples, **extras) -> None:
    """`evaluate`'s rules, checked before the (slow) model load."""
    for flag, value, low in (("batch-size", batch_size, 1), ("max-batches", max_batches, 0),
                             ("samples", samples, 1), ("mc-samples", mc_samples, 1)):  # fmt: skip
        if value is not None:
            check_count(flag, value, low, "(0: all)" if flag == "max-batches" else "")
    given = [name for name, value in {"mc_samples": mc_samples, **extras}.items() if value]
    if given and not uncertainty:
        raise InputError(f"--{given[0].replace('_', '-')} needs --uncertainty")


def evaluate(
    run_dir,
    *,
    data: Paths | None = None,
    batch_size: int = 32,
    max_batches: int = 0,
    uncertainty: bool = False,
    samples: int = 8,
    mc_samples: int | None = None,
    ensemble: Paths | None = None,
    plot: str | Path | None = None,
    ood_data: Paths | None = None,
    drop_unknown: bool = False,
) -> dict:
    """Evaluates a run on `data` (file patterns) or on its validation split.

    Args:
        run_dir: the run (it needs a tokenizer).
        data: file pattern(s) read whole; None: the run's validation split.
        batch_size: sequences per batch.
        max_batches: batches evaluated (0: all).
        uncertainty: add the `"uncertainty"` entry (below).
        samples: gaussian head: latent samples per token.
        mc_samples: Monte Carlo dropout with this many passes (a model with dropout).
        ensemble: more runs (one tokenizer): a deep ensemble with `run_dir`.
        plot: a directory for a reliability diagram and a risk-coverage curve (PNG).
        ood_data: other text: the AUROC of telling its blocks apart.
        drop_unknown: `ood_data` loses the characters a char tokenizer cannot encode
            (else such a character is an error).

    Returns:
        `{"loss", "perplexity", "accuracy", "tokens"}`, and with `uncertainty` an
        `"uncertainty"` dict: `nll`, `ece`, `brier`, `entropy`, `mutual_information`,
        `aurc`, `auroc_error_detection`, `accuracy_at_50_coverage`, `method`, `samples`
        (+ `plots`: the PNG paths; + `ood`: `auroc_entropy`, `auroc_mutual_information`,
        `auroc_nll`, `blocks_in_domain`, `blocks_ood`).

    Raises:
        InputError: an option out of range, `mc_samples`/`ensemble`/`plot`/`ood_data`
            without `uncertainty`, MC dropout on a model without dropout, an ensemble
            member with another tokenizer.
        RunDirError: no run at `run_dir`, or a run without tokenizer.
        DataError: a file pattern that matches nothing, unreadable text.

    Examples:

    >>> evaluate("runs/tiny", data="notes.txt", max_batches=2)["perplexity"]  # doctest: +SKIP
    5.41
    """
    data, ensemble, ood_data = _paths(data), _paths(ensemble), _paths(ood_data)
    _check_options(batch_size, max_batches, uncertainty, samples, mc_samples,
                   ensemble=ensemble, plot=plot, ood_data=ood_data)  # fmt: skip
    config = RunDir(run_dir).read_config()
    files = resolve_files(data) if data else None
    model, tokenizer = load_run(run_dir)
    if tokenizer is None:
        raise RunDirError(
            f"{run_dir} has no tokenizer, so its text cannot be evaluated; score token "
            "ids with the Python API"
        )

    def dataset(paths=files, split="all" if files else "val"):
        return make_eval_dataset(config.data, tokenizer, batch_size, files=paths, split=split)

    # a forward pass over whole sequences, as a prefill: XLA's CPU backend would hold a
    # float32 copy of every weight of a model larger than the CPU's cache (57.7 GiB for
    # the int4 moonshot's experts), so such a model is evaluated by TensorFlow's kernels
    jit_compile = xla_prefill(model, config.runtime.jit_compile)
    result = evaluate_model(model, dataset(), max_batches=max_batches, jit_compile=jit_compile)
    if not uncertainty:
        return result
    predictor = make_predictor(model, tokenizer, run_dir=run_dir, samples=samples,
                               mc_samples=mc_samples, ensemble=ensemble)  # fmt: skip
    title = f"{Path(run_dir).name} ({predictor.method}, {predictor.samples} sample(s))"
    with tempfile.TemporaryDirectory() as scratch:  # --drop-unknown's copies
        other = None
        if ood_data:
            ood_files = resolve_files(ood_data)
            if drop_unknown:
                ood_files = known_text_files(ood_files, tokenizer, scratch)
            other = dataset(ood_files, "all")
        result["uncertainty"] = uncertainty_summary(
            predictor, dataset(), max_batches=max_batches, plot=plot, title=title,
            ood_dataset=other,
        )  # fmt: skip
    return result
