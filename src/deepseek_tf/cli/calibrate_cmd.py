"""`deepseek-tf calibrate RUN_DIR --out NEW_RUN`: temperature scaling on the validation split."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="fit a logit temperature on the validation split; write a calibrated run",
        description="Temperature scaling: fits one logit temperature on the first half of "
        "the validation split, reports NLL and ECE before/after on the second half, and "
        "writes a new run (calibration.logit_temperature) that every command then uses.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="the calibrated run directory")
    parser.add_argument(
        "--samples", type=int, default=8, help="gaussian head: latent samples per token"
    )
    parser.add_argument(
        "--max-batches", type=int, default=0, help="validation batches to read (0: all)"
    )
    parser.set_defaults(func=run, api="deepseek_tf.api.evaluation:calibrate")


def run(args) -> int:
    from deepseek_tf.api.evaluation import calibrate

    record = calibrate(
        args.run_dir, out=args.out, samples=args.samples, max_batches=args.max_batches
    )
    print(json.dumps(record))
    return 0
