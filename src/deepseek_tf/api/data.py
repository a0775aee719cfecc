"""Data verbs of the Python API: `prepare_data` (corpora larger than memory into shards)
and `train_tokenizer` (a char or byte-level BPE tokenizer into a directory).

`deepseek-tf data prepare` and `deepseek-tf tokenizer train` print what these return;
their flags are the keywords (`--vocab-size` -> `vocab_size`).

Examples:

>>> import deepseek_tf as ds                                                # doctest: +SKIP
>>> ds.train_tokenizer(out="tok", files=["corpus/*.txt"], kind="bpe", vocab_size=512)
... # doctest: +SKIP
{'kind': 'bpe', 'vocab_size': 512, 'path': 'tok/tokenizer.json', ...}
>>> ds.prepare_data(["corpus/*.txt"], out="data/prep", tokenizer="tok")   # doctest: +SKIP
{'format': ..., 'tokenizer': 'bpe', 'vocab_size': 512, 'splits': {...}, 'out': 'data/prep'}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from deepseek_tf.config.schema import TOKENIZER_TYPES
from deepseek_tf.data.corpus import read_texts, resolve_files
from deepseek_tf.data.prepare import prepare
from deepseek_tf.errors import InputError, check_count
from deepseek_tf.tokenizers import train_tokenizer as fit_tokenizer

BAD_RECORD_CHOICES = ("fail", "skip")


def _patterns(files, option: str) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        return [os.fspath(files)]
    if files is None:
        raise InputError(f"{option}: give at least one file or glob")
    return [os.fspath(f) for f in files]


def prepare_data(
    files: Sequence[str],
    *,
    out,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    text_field: str = "text",
    on_bad_record: str = "fail",
    val_fraction: float = 0.1,
    record_tokens: int = 1 << 16,
    shard_tokens: int = 1 << 26,
    verbose: int = 1,
) -> dict:
    """Tokenizes text files into sharded TFRecord files, the tokenizer and a manifest in
    the new directory `out` (`deepseek-tf data prepare`); `train(overrides=
    ["data.prepared=OUT"])` then streams them without holding the corpus in memory.

    Args:
        files: files or globs: .txt (read in ~16 KiB pieces cut at line ends), .jsonl
            (one JSON object a line), .parquet (the `[parquet]` extra).
        out: a new (or empty) directory.
        tokenizer: "char" or "bpe" (trained on the inputs in one streaming pass), a run
            directory, or a `tokenizer.json` / directory from `train_tokenizer`.
        vocab_size: bpe: the target vocabulary.
        text_field: .jsonl / .parquet: the field holding the text.
        on_bad_record: "fail" naming the file and line, or "skip" and count it.
        val_fraction: records held out for validation (by a hash of file and position).
        record_tokens: token ids per TFRecord record.
        shard_tokens: token ids per shard file (about).
        verbose: 0 prints nothing; 1 a line of counts.

    Returns:
        The manifest (a dict: `tokenizer`, `vocab_size`, `dtype`, `splits` with each
        split's `tokens` and `shards`, `skipped`, `inputs`, ...) and `out`.

    Raises:
        InputError / DataError: an existing `out`, a bad option, an unreadable or (with
        `on_bad_record="fail"`) malformed file, naming the file and line.
    """
    if on_bad_record not in BAD_RECORD_CHOICES:
        raise InputError(f"--on-bad-record: one of fail, skip, got {on_bad_record!r}")
    manifest = prepare(
        _patterns(files, "--files"),
        tokenizer,
        out,
        vocab_size=vocab_size,
        text_field=text_field,
        on_bad_record=on_bad_record,
        val_fraction=val_fraction,
        record_tokens=record_tokens,
        shard_tokens=shard_tokens,
        log=print if verbose else None,
    )
    return {**manifest, "out": str(out)}


def train_tokenizer(
    *,
    out,
    files: Sequence[str] = (),
    kind: str = "char",
    vocab_size: int = 4096,
) -> dict:
    """Trains a tokenizer on text files and writes it into the directory `out`
    (`deepseek-tf tokenizer train`); `train(overrides=["data.tokenizer=OUT"])` uses it.

    Args:
        out: a directory (created if needed) for `tokenizer.json` (bpe) or
            `char_tokenizer.json` (char).
        files: UTF-8 text files or globs (default: the bundled tiny-Shakespeare corpus).
        kind: "char" (the characters seen) or "bpe" (byte-level BPE).
        vocab_size: bpe: the target vocabulary (a small corpus may give fewer tokens).

    Returns:
        A dict: `kind`, `vocab_size` (what the tokenizer has), `requested_vocab_size`,
        `files` (the files read), `path` (the file written) and `note` (a sentence when
        a bpe vocabulary came out smaller than asked, else None).

    Raises:
        InputError: `out` is an existing file, an unknown `kind`, a `vocab_size` below 1.
        DataError: a file that is missing, empty or not UTF-8.
    """
    if kind not in TOKENIZER_TYPES:
        raise InputError(f"--kind: one of {', '.join(TOKENIZER_TYPES)}, got {kind!r}")
    check_count("vocab-size", vocab_size, 1)
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out} is an existing file; choose a directory")
    paths = resolve_files(_patterns(files, "--files"))
    tokenizer = fit_tokenizer(kind, texts=read_texts(paths), vocab_size=vocab_size, log=None)
    path = tokenizer.save(out)
    note = None
    if kind == "bpe" and tokenizer.vocab_size < vocab_size:
        note = (
            f"the corpus gave {tokenizer.vocab_size} tokens, fewer than --vocab-size "
            f"{vocab_size} (merges ran out on this text; more text gives more)"
        )
    return {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "requested_vocab_size": vocab_size,
        "files": paths,
        "path": str(path),
        "note": note,
    }
