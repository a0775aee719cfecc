"""`deepseek-tf` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import os
import sys

from deepseek_tf import __version__, xla_cache
from deepseek_tf.cli import (
    calibrate_cmd,
    compress_cmd,
    convert_cmd,
    data_cmd,
    eval_cmd,
    export_cmd,
    federated_cmd,
    generate_cmd,
    info_cmd,
    serve_cmd,
    tokenizer_cmd,
    train_cmd,
)
from deepseek_tf.errors import DeepSeekTFError
from deepseek_tf.quiet import import_tensorflow_quietly

COMMANDS = (
    train_cmd,
    generate_cmd,
    eval_cmd,
    info_cmd,
    tokenizer_cmd,
    data_cmd,
    convert_cmd,
    serve_cmd,
    export_cmd,
    compress_cmd,
    calibrate_cmd,
    federated_cmd,
)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS, [], ()):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """Every subcommand's parser shows defaults in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The `deepseek-tf` parser: each subcommand's parser names its library function in
    its `api` default (see `deepseek_tf.cli.common`)."""
    parser = argparse.ArgumentParser(
        prog="deepseek-tf",
        description="Build, train, evaluate and sample DeepSeek-class models (TensorFlow/Keras 3).",
    )
    parser.add_argument("--version", action="version", version=f"deepseek-tf {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show TensorFlow's start-up log lines"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    """Runs `deepseek-tf ARGV`; returns the exit code (2: a one-line `error: ...`)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", None) == "auto":  # allocator statistics, on any CPU
        os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # see training.autobatch
    needs = getattr(args, "tensorflow", None)  # a command may not need TensorFlow
    if needs is None or needs(args):
        xla_cache.enable()  # before TensorFlow reads its flags (see deepseek_tf.xla_cache)
        if args.verbose:  # imported plainly first: its start-up lines show
            import tensorflow  # noqa: F401
        else:
            import_tensorflow_quietly()
    try:
        return int(args.func(args) or 0)
    except DeepSeekTFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # out of memory: one line naming the allocation, not a traceback
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory ({_first_line(e)})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _out_of_memory(error: BaseException) -> bool:
    """A `MemoryError`, or TensorFlow's `ResourceExhaustedError` (an allocation refused)."""
    tf = sys.modules.get("tensorflow")
    exhausted = getattr(getattr(tf, "errors", None), "ResourceExhaustedError", ())
    return isinstance(error, (MemoryError, exhausted))


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", "") or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
