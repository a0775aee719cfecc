"""`deepseek-tf eval RUN_DIR [--data FILES] [--uncertainty ...]`: loss, perplexity, accuracy
and, with `--uncertainty`, calibration, selective prediction and OOD detection, as JSON."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a run on a file or its validation split")
    parser.add_argument("run_dir")
    parser.add_argument("--data", nargs="+", help="file pattern(s); default: validation split")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--max-batches", type=int, default=0, help="0: all")
    unc = parser.add_argument_group("uncertainty")
    unc.add_argument(
        "--uncertainty",
        action="store_true",
        help="add NLL, ECE, Brier, predictive entropy, mutual information, AUROC of error "
        "detection, AURC and accuracy at 50%% coverage",
    )
    unc.add_argument(
        "--samples", type=int, default=8, help="gaussian head: latent samples per token"
    )
    unc.add_argument("--mc-samples", type=int, help="Monte Carlo dropout with this many passes")
    unc.add_argument(
        "--ensemble", nargs="+", metavar="RUN", help="more runs (one tokenizer): a deep ensemble"
    )
    unc.add_argument("--plot", metavar="DIR", help="write a reliability diagram and a "
                     "risk-coverage curve (PNG) into DIR")  # fmt: skip
    unc.add_argument(
        "--ood-data", nargs="+", metavar="FILE", help="other text: AUROC of detecting its blocks"
    )
    unc.add_argument(
        "--drop-unknown",
        action="store_true",
        help="--ood-data: drop characters outside a char tokenizer's vocabulary (default: error)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    print(json.dumps(evaluate(args)))
    return 0


def evaluate(args) -> dict:
    """The JSON `eval` prints, for parsed `args` (`deepseek_tf.evaluate` calls it too)."""
    from deepseek_tf.api import load
    from deepseek_tf.data.corpus import resolve_files
    from deepseek_tf.data.pipeline import make_eval_dataset
    from deepseek_tf.errors import InputError, RunDirError
    from deepseek_tf.rundir import RunDir
    from deepseek_tf.training.evaluate import evaluate

    if args.batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.max_batches < 0:
        raise InputError(f"--max-batches: must be >= 0 (0: all), got {args.max_batches}")
    extras = [f for f in ("mc_samples", "ensemble", "plot", "ood_data") if getattr(args, f)]
    if extras and not args.uncertainty:
        raise InputError(f"--{extras[0].replace('_', '-')} needs --uncertainty")
    config = RunDir(args.run_dir).read_config()
    files = resolve_files(args.data) if args.data else None
    model, tokenizer = load(args.run_dir)
    if tokenizer is None:
        raise RunDirError(
            f"{args.run_dir} has no tokenizer, so its text cannot be evaluated; score token "
            "ids with the Python API"
        )
    split = "all" if files else "val"

    def dataset(paths=files, part=split):
        return make_eval_dataset(config.data, tokenizer, args.batch_size, files=paths, split=part)

    result = evaluate(
        model, dataset(), max_batches=args.max_batches, jit_compile=config.runtime.jit_compile
    )
    if args.uncertainty:
        from deepseek_tf.cli.uncertainty import uncertainty_result

        result["uncertainty"] = uncertainty_result(args, config, model, tokenizer, dataset)
    return result
