"""`deepseek-tf eval RUN_DIR [--data FILES]`: loss, perplexity, accuracy as JSON."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a run on a file or its validation split")
    parser.add_argument("run_dir")
    parser.add_argument("--data", nargs="+", help="file pattern(s); default: validation split")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--max-batches", type=int, default=0, help="0: all")
    parser.set_defaults(func=run)


def run(args) -> int:
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
    config = RunDir(args.run_dir).read_config()
    files = resolve_files(args.data) if args.data else None
    model, tokenizer = load(args.run_dir)
    if tokenizer is None:
        raise RunDirError(
            f"{args.run_dir} has no tokenizer, so its text cannot be evaluated; score token "
            "ids with the Python API"
        )
    split = "all" if files else "val"
    ds = make_eval_dataset(config.data, tokenizer, args.batch_size, files=files, split=split)
    result = evaluate(
        model, ds, max_batches=args.max_batches, jit_compile=config.runtime.jit_compile
    )
    print(json.dumps(result))
    return 0
