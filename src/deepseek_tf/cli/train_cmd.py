"""`deepseek-tf train`: train a preset or config; `--resume` continues a run.

Parses, calls `deepseek_tf.api.training.train` and prints its summary.
"""

from __future__ import annotations

from deepseek_tf.cli.common import add_config_args, api_function, keywords

API = "deepseek_tf.api.training:train"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (default: shakespeare-char)")
    add_config_args(parser)
    parser.add_argument("--out", help="run directory (default: runs/<preset>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--data",
        nargs="+",
        metavar="FILES",
        help="text files or globs to train on (sets data.files; default: the bundled "
        "tiny-Shakespeare corpus)",
    )
    parser.add_argument(
        "--init-from",
        metavar="RUN_OR_HF_DIR",
        help="fine-tune: start from this run's or Hugging Face checkpoint's weights and "
        "tokenizer, with a fresh optimizer (its model section; --config gives train/data; "
        "LoRA with --set train.lora_rank=R)",
    )
    parser.add_argument(
        "--batch-size",
        help="sequences per step (overrides train.batch_size), or 'auto': the largest batch "
        "whose step fits --memory-budget",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=0.0,
        metavar="MIB",
        help="--batch-size auto: memory one training step may add, per device (default: 80%% "
        "of the GPU's memory, or of the available RAM)",
    )
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=300,
        help="tokens of sample text printed after training (0: none)",
    )
    parser.set_defaults(func=run, api=API)


def run(args) -> int:
    from deepseek_tf.training.report import summary_lines

    summary = api_function(args.api)(**keywords(args))
    if summary.get("already_complete") or not summary["chief"]:
        return 0  # (other workers write no run directory)
    if summary["sample"] is not None:
        print(f"--- sample ---\n{summary['sample']}\n---")
    elif summary["sample_note"]:
        print(f"(no sample: {summary['sample_note']})")
    print("\n".join(summary_lines(summary, summary["example_prompt"])), flush=True)
    return 0
