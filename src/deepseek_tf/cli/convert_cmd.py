"""`deepseek-tf convert`: Hugging Face DeepSeek-V2/V3 checkpoints <-> run directories.

deepseek-tf convert --from-hf HF_DIR --out RUN_DIR [--dtype bfloat16|float32]
                    [--quantize int8|int4 [--group-size N]]
deepseek-tf convert --to-hf RUN_DIR --out HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a Hugging Face DeepSeek-V2/V3 checkpoint to a run, or back"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from-hf", dest="hf_dir", metavar="HF_DIR", help="a Hugging Face model directory"
    )
    source.add_argument(
        "--to-hf", dest="run_dir", metavar="RUN_DIR", help="a deepseek-tf run directory"
    )
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="--from-hf: the run's weights and precision (default: the checkpoint's, "
        "bfloat16 for BF16 and FP8 checkpoints); --to-hf: the safetensors dtype (default "
        "float32)",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="--from-hf: store every projection (attention, FFN, experts, an untied head) "
        "as weight-only int8/int4 codes, quantized tensor by tensor as the checkpoint is "
        "read (the float model is never held whole)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=-1,
        help="--quantize: inputs per scale (default -1: one per output channel); must "
        "divide the routed experts' input widths",
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
    parser.set_defaults(
        func=run,
        api=(
            "deepseek_tf.api.conversion:convert_from_hf",
            "deepseek_tf.api.conversion:convert_to_hf",
        ),
    )


def run(args) -> int:
    from deepseek_tf.api.conversion import convert_from_hf, convert_to_hf
    from deepseek_tf.errors import ConfigError

    if args.hf_dir is not None:
        if args.max_shard_size != "5GB" or args.adapter_only:
            raise ConfigError("--max-shard-size and --adapter-only apply to --to-hf only")
        summary = convert_from_hf(
            args.hf_dir,
            out=args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            group_size=args.group_size,
        )
    else:
        if args.quantize is not None or args.group_size != -1:
            raise ConfigError("--quantize and --group-size apply to --from-hf only")
        summary = convert_to_hf(
            args.run_dir,
            out=args.out,
            dtype=args.dtype,
            adapter_only=args.adapter_only,
            max_shard_size=args.max_shard_size,
        )
    print(summary.describe())
    return 0
