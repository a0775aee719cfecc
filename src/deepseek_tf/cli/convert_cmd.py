"""`deepseek-tf convert`: Hugging Face DeepSeek-V2/V3 checkpoints <-> run directories.

deepseek-tf convert --from-hf HF_DIR --out RUN_DIR [--dtype bfloat16|float32]
deepseek-tf convert --to-hf RUN_DIR --out HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]
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
        help="--from-hf: the run's weights and precision (default: the checkpoint's, "
        "bfloat16 for BF16 and FP8 checkpoints); --to-hf: the safetensors dtype (default "
        "float32)",
    )
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="--to-hf of a LoRA run: write the adapters alone in PEFT's layout "
        "(adapter_config.json + adapter_model.safetensors) instead of merging them",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="--to-hf: largest safetensors shard, e.g. 5GB, 500MB (default 5GB)",
    )
    parser.set_defaults(func=run)


UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str) -> int:
    """`"5GB"` -> bytes (decimal units as Hugging Face's `max_shard_size`; KiB/MiB/GiB too)."""
    from deepseek_tf.errors import ConfigError

    raw = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if raw.endswith(unit):
            number = raw[: -len(unit)].strip()
            break
    else:
        unit, number = "B", raw
    try:
        size = int(float(number) * UNITS[unit])
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(f"--max-shard-size: {text!r} is not a size such as 5GB or 500MB")
    return size


def run(args) -> int:
    print(convert(args).describe())
    return 0


def convert(args):
    """Converts as parsed `args` say; returns the conversion's summary."""
    from deepseek_tf.convert import convert_from_hf, convert_to_hf
    from deepseek_tf.errors import ConfigError

    max_shard = parse_size(args.max_shard_size)
    if args.from_hf:
        if args.max_shard_size != "5GB" or args.adapter_only:
            raise ConfigError("--max-shard-size and --adapter-only apply to --to-hf only")
        return convert_from_hf(args.from_hf, args.out, dtype=args.dtype)
    dtype = args.dtype or "float32"
    return convert_to_hf(
        args.to_hf, args.out, dtype, max_shard_bytes=max_shard, adapter_only=args.adapter_only
    )
