"""`deepseek-tf compress {quantize,qat,prune,distill,lowrank} RUN_DIR --out OUT_DIR [options]`.

Parse, call, print: each method's options are declared here (argparse only, so
`deepseek-tf --help` stays fast) and map one to one onto the keywords of its library
function, `deepseek_tf.compress.<method>(run_dir, *, out, ..., quiet)` (each subparser
names it in `api`). The record it returns (what was done, sizes, losses, seconds) is
printed as JSON; the library also appended it to `OUT_DIR/compression.json`.
"""

from __future__ import annotations

import json

from deepseek_tf.cli.common import add_override_arg, api_function, keywords

METHODS = {
    "quantize": "post-training quantisation: int8, int4, float8, GPTQ or AWQ (Keras quantizers)",
    "qat": "quantisation-aware fine-tuning (int8 fake-quant), then conversion to int8",
    "prune": "structured pruning of heads, FFN channels and experts, physically removed",
    "distill": "train a smaller student on a teacher's softened distribution",
    "lowrank": "replace projections by truncated-SVD factor pairs",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("compress", help="compress a trained run into a new run")
    methods = parser.add_subparsers(dest="method", required=True)
    for name, help_text in METHODS.items():
        sub = methods.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("run_dir", help="the trained run to compress (a teacher for distill)")
        sub.add_argument("--out", required=True, help="new run directory")
        sub.add_argument("--quiet", action="store_true", help="no progress lines")
        OPTIONS[name](sub)
        sub.set_defaults(func=run, api=f"deepseek_tf.compress:{name}")


def _finetune_args(parser, steps: int, learning_rate: float) -> None:
    parser.add_argument(
        "--steps", type=int, default=steps, help=f"fine-tuning steps (default {steps})"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=learning_rate, help="peak fine-tuning lr"
    )


def _quantize_args(parser) -> None:
    parser.add_argument("--mode", required=True, choices=["int8", "int4", "float8", "gptq", "awq"])
    parser.add_argument("--bits", type=int, default=4, help="gptq: 2, 3, 4 or 8; awq: 4")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="int4/gptq/awq: inputs per scale, -1: one per output channel (default: int4 -1, "
        "gptq/awq 128)",
    )
    parser.add_argument(
        "--calibration-samples", type=int, default=128, help="gptq/awq: training sequences"
    )
    parser.add_argument(
        "--include",
        default=None,
        help="comma list of what to quantize: attention, ffn, head, experts (default "
        "attention,ffn, plus the routed experts of an MoE run under int8/int4)",
    )


def _qat_args(parser) -> None:
    _finetune_args(parser, steps=300, learning_rate=1e-4)


def _prune_args(parser) -> None:
    parser.add_argument(
        "--sparsity", type=float, default=0.3, help="fraction of each target removed (0..1)"
    )
    parser.add_argument(
        "--targets", default="heads,ffn,experts", help="comma list: heads, ffn, experts"
    )
    parser.add_argument("--importance", choices=["magnitude", "gradient"], default="gradient")
    parser.add_argument(
        "--schedule-power", type=float, default=3.0, help="polynomial sparsity schedule power"
    )
    parser.add_argument(
        "--unstructured",
        action="store_true",
        help="also zero the smallest remaining weights of the projections (masks, same shape)",
    )
    _finetune_args(parser, steps=300, learning_rate=3e-4)


def _distill_args(parser) -> None:
    student = parser.add_mutually_exclusive_group(required=True)
    student.add_argument("--student-config", help="YAML config of the student")
    student.add_argument("--student-preset", help="a bundled preset for the student")
    add_override_arg(parser, "override one student config value (repeatable)")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the distillation term (hard: 1-alpha)"
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--steps", type=int, default=0, help="student training steps (0: student train.steps)"
    )


def _lowrank_args(parser) -> None:
    rank = parser.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help="fixed rank of every factorised projection")
    rank.add_argument(
        "--energy",
        type=float,
        default=None,
        help="smallest rank keeping this fraction of the squared singular values (default "
        "0.9 without --rank)",
    )
    parser.add_argument("--targets", default="ffn", help="comma list: attention, ffn")
    _finetune_args(parser, steps=0, learning_rate=1e-4)


OPTIONS = {
    "quantize": _quantize_args,
    "qat": _qat_args,
    "prune": _prune_args,
    "distill": _distill_args,
    "lowrank": _lowrank_args,
}


def run(args) -> int:
    """Calls the method's library function (its `api` default) with the parsed options and
    prints its record as one JSON line."""
    record = api_function(args.api)(**keywords(args, skip=("method",)))
    print(json.dumps(record))
    return 0
