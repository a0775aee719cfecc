"""`deepseek-tf` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import sys

from deepseek_tf import __version__
from deepseek_tf.cli import (
    calibrate_cmd,
    compress_cmd,
    convert_cmd,
    eval_cmd,
    export_cmd,
    federated_cmd,
    generate_cmd,
    info_cmd,
    serve_cmd,
    tokenizer_cmd,
    train_cmd,
)
from deepseek_tf.cli.quiet import import_tensorflow_quietly
from deepseek_tf.errors import DeepSeekTFError

COMMANDS = (
    train_cmd,
    generate_cmd,
    eval_cmd,
    info_cmd,
    tokenizer_cmd,
    convert_cmd,
    serve_cmd,
    export_cmd,
    compress_cmd,
    calibrate_cmd,
    federated_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-tf",
        description="Build, train, evaluate and sample DeepSeek-class models (TensorFlow/Keras 3).",
    )
    parser.add_argument("--version", action="version", version=f"deepseek-tf {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show TensorFlow's start-up log lines"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    needs = getattr(args, "tensorflow", None)  # a command may not need TensorFlow
    if not args.verbose and (needs is None or needs(args)):
        import_tensorflow_quietly()
    try:
        return int(args.func(args) or 0)
    except DeepSeekTFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
