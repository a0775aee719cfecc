"""`deepseek-tf eval RUN_DIR [--data FILES]`: loss, perplexity, accuracy as JSON."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a run on a file or its validation split")
    parser.add_argument("run_dir")
    parser.add_argument("--data", nargs="+", help="file pattern(s); default: validation split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batches", type=int, default=0, help="0: all")
    parser.set_defaults(func=run)


def run(args) -> int:
    from deepseek_tf.api import load
    from deepseek_tf.config.loader import load_run_config
    from deepseek_tf.data.corpus import resolve_files
    from deepseek_tf.data.pipeline import make_eval_dataset
    from deepseek_tf.training.evaluate import evaluate

    config = load_run_config(args.run_dir)
    model, tokenizer = load(args.run_dir)
    if args.data:
        files = resolve_files(args.data)
        ds = make_eval_dataset(config.data, tokenizer, args.batch_size, files=files, split="all")
    else:
        ds = make_eval_dataset(config.data, tokenizer, args.batch_size, split="val")
    result = evaluate(
        model, ds, max_batches=args.max_batches, jit_compile=config.runtime.jit_compile
    )
    print(json.dumps(result))
    return 0
