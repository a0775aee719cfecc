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
    parser.set_defaults(func=run, api="deepseek_tf.api.evaluation:evaluate")


def run(args) -> int:
    from deepseek_tf.api.evaluation import evaluate

    result = evaluate(
        args.run_dir,
        data=args.data,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        uncertainty=args.uncertainty,
        samples=args.samples,
        mc_samples=args.mc_samples,
        ensemble=args.ensemble,
        plot=args.plot,
        ood_data=args.ood_data,
        drop_unknown=args.drop_unknown,
    )
    print(json.dumps(result))
    return 0
