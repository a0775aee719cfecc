"""`deepseek-tf data prepare --files ... --tokenizer RUN|char|bpe|PATH --out DIR`.

Tokenizes corpora larger than memory into sharded TFRecord files and a manifest;
`train --set data.prepared=DIR` then streams them (see `deepseek_tf.data.prepared`).
Parses, calls `deepseek_tf.api.data.prepare_data` and prints what to run next.
"""

from __future__ import annotations

from deepseek_tf.cli.common import api_function, keywords

API = "deepseek_tf.api.data:prepare_data"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare corpora larger than memory for training", description=__doc__
    )
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    prep = commands.add_parser(
        "prepare",
        help="tokenize .txt / .jsonl / .parquet files into shards and a manifest",
        description="Stream text files through a tokenizer into sharded TFRecord files "
        "(train-*.tfrecord, val-*.tfrecord), the tokenizer and manifest.json.",
    )
    prep.add_argument(
        "--files",
        nargs="+",
        required=True,
        metavar="GLOB",
        help="input files or globs: .txt, .jsonl (one JSON object a line), "
        ".parquet (Hugging Face datasets' export)",
    )
    prep.add_argument(
        "--tokenizer",
        default="char",
        help="char or bpe (trained on the inputs in one streaming pass), a run directory, "
        "or a tokenizer.json / directory from `deepseek-tf tokenizer train`",
    )
    prep.add_argument("--out", required=True, metavar="DIR", help="new directory to write")
    prep.add_argument("--vocab-size", type=int, default=4096, help="bpe: target vocabulary")
    prep.add_argument("--text-field", default="text", help="jsonl / parquet: the text field")
    prep.add_argument(
        "--on-bad-record",
        choices=["fail", "skip"],
        default="fail",
        help="a malformed JSON line, a missing text field or a non-UTF-8 line: fail naming "
        "the file and line, or skip it and count it in the manifest",
    )
    prep.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="records held out for validation (by a hash of file and index)",
    )
    prep.add_argument(
        "--record-tokens", type=int, default=1 << 16, help="token ids per TFRecord record"
    )
    prep.add_argument(
        "--shard-tokens", type=int, default=1 << 26, help="token ids per shard file (about)"
    )
    prep.set_defaults(func=run, api=API)


def run(args) -> int:
    result = api_function(args.api)(**keywords(args))
    print(
        f"next: deepseek-tf train --preset shakespeare-char --set data.prepared={result['out']} "
        "--out runs/NAME"
    )
    return 0
