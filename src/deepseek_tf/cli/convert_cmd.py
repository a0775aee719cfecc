"""`deepseek-tf convert`: Hugging Face DeepSeek-V2/V3 checkpoints <-> run directories.

deepseek-tf convert --from-hf HF_DIR --out RUN_DIR
deepseek-tf convert --to-hf RUN_DIR --out HF_DIR [--dtype bfloat16]
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a Hugging Face DeepSeek-V2/V3 checkpoint to a run, or back"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face model directory")
    source.add_argument("--to-hf", metavar="RUN_DIR", help="a deepseek-tf run directory")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="--to-hf only: weight dtype of the safetensors files (default float32)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from deepseek_tf.convert import convert_from_hf, convert_to_hf
    from deepseek_tf.errors import ConfigError

    if args.from_hf:
        if args.dtype:
            raise ConfigError("--dtype: only applies to --to-hf (runs are float32)")
        summary = convert_from_hf(args.from_hf, args.out)
    else:
        summary = convert_to_hf(args.to_hf, args.out, dtype=args.dtype or "float32")
    print(summary.describe())
    return 0
