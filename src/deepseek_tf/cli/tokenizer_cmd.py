"""`deepseek-tf tokenizer train`: train a char or byte-level BPE tokenizer on text files.

Parses, calls `deepseek_tf.api.data.train_tokenizer` and prints one summary line.
"""

from __future__ import annotations

from deepseek_tf.cli.common import api_function, keywords
from deepseek_tf.config.schema import TOKENIZER_TYPES

API = "deepseek_tf.api.data:train_tokenizer"


def add_parser(subparsers):
    """Registers the `tokenizer` command (with its `train` subcommand) on `subparsers`."""
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
    train.set_defaults(func=run, api=API)
    return parser


def run(args) -> int:
    result = api_function(args.api)(**keywords(args))
    print(
        f"trained {result['kind']} tokenizer on {len(result['files'])} file(s): "
        f"vocab_size={result['vocab_size']}, wrote {result['path']}"
    )
    if result["note"]:
        print(f"note: {result['note']}")
    return 0
