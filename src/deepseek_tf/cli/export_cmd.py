"""`deepseek-tf export RUN_DIR --format savedmodel|litert|onnx|gguf --out PATH`."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a trained run (SavedModel, LiteRT, ONNX or GGUF), verified"
    )
    parser.add_argument("run_dir")
    parser.add_argument("--format", required=True, choices=["savedmodel", "litert", "onnx", "gguf"])
    parser.add_argument(
        "--out", required=True, help="output directory (savedmodel) or file (.tflite, .onnx, .gguf)"
    )
    parser.add_argument(
        "--prefill-len",
        type=int,
        default=None,
        help="litert: fixed prompt length of the prefill signature (default min(16, context))",
    )
    parser.add_argument(
        "--int8", action="store_true", help="litert: dynamic-range int8 weight quantisation"
    )
    parser.add_argument(
        "--quant",
        default=None,
        help="gguf: tensor type, bf16 (default), q8_0, q4_0 or f32",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip reloading and comparing with Keras",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run, api="deepseek_tf.api.deployment:export")


def run(args) -> int:
    from deepseek_tf.api.deployment import export

    report = export(
        args.run_dir,
        format=args.format,
        out=args.out,
        prefill_len=args.prefill_len,
        int8=args.int8,
        quant=args.quant,
        verify=args.verify,
        overwrite=args.overwrite,
    )
    signatures = ", ".join(report["signatures"])
    print(f"exported {args.format} to {report['path']}: signatures {signatures}")
    for key, value in report.items():
        if key not in ("format", "path", "signatures"):
            print(f"  {key}: {value}")
    return 0
