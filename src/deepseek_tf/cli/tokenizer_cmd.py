"""`deepseek-tf tokenizer train`: train a char or byte-level BPE tokenizer on text files."""

from __future__ import annotations

import argparse

from deepseek_tf.config.schema import TOKENIZER_TYPES
from deepseek_tf.data.corpus import read_texts, resolve_files


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `tokenizer` command (with its `train` subcommand) on `subparsers`."""
    parser = subparsers.add_parser(
        "tokenizer", help="train tokenizers", description="Tokenizer utilities."
    )
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train",
        help="train a char or bpe tokenizer on text files",
        description="Train a tokenizer and write it into a directory.",
    )
    train.add_argument(
        "--files",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="UTF-8 text files or globs (default: the bundled tiny Shakespeare corpus)",
    )
    train.add_argument("--kind", choices=TOKENIZER_TYPES, default="char", help="tokenizer type")
    train.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        metavar="N",
        help="bpe target vocabulary size (char: the set of characters seen)",
    )
    train.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory to write tokenizer.json (bpe) or char_tokenizer.json (char) into",
    )
    train.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from deepseek_tf.tokenizers import train_tokenizer  # loads TensorFlow

    """Train the tokenizer described by `args`, save it and print one summary line."""
    files = resolve_files(args.files)
    tokenizer = train_tokenizer(args.kind, read_texts(files), vocab_size=args.vocab_size)
    path = tokenizer.save(args.out)
    print(
        f"trained {tokenizer.kind} tokenizer on {len(files)} file(s): "
        f"vocab_size={tokenizer.vocab_size}, wrote {path}"
    )
    return 0
