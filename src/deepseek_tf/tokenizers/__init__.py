"""Tokenizers: character-level and byte-level BPE behind one interface."""

from __future__ import annotations

import os
from collections.abc import Sequence

from deepseek_tf.data.corpus import read_texts, resolve_files
from deepseek_tf.errors import ConfigError, RunDirError, TokenizerError
from deepseek_tf.tokenizers.base import BPE_FILE, CHAR_FILE, EOS_TOKEN, Tokenizer
from deepseek_tf.tokenizers.bpe import BPETokenizer
from deepseek_tf.tokenizers.char import CharTokenizer

__all__ = [
    "BPE_FILE",
    "CHAR_FILE",
    "EOS_TOKEN",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "load_tokenizer_path",
    "train_tokenizer",
]


def train_tokenizer(
    kind: str, texts_or_files: Sequence[str | os.PathLike[str]], vocab_size: int = 4096
) -> Tokenizer:
    """Train a tokenizer of `kind` ("char" | "bpe").

    Items of `texts_or_files` that are `str` are training texts; `os.PathLike` items
    (e.g. `pathlib.Path`) are files, validated and read as UTF-8. `vocab_size` is the
    bpe target (ignored for char, whose vocabulary is the set of characters seen).
    """
    if isinstance(texts_or_files, (str, os.PathLike)):
        raise TypeError("texts_or_files must be a sequence of texts or paths, not one item")
    paths = [os.fspath(p) for p in texts_or_files if isinstance(p, os.PathLike)]
    texts = [t for t in texts_or_files if isinstance(t, str)]
    if paths:
        texts.extend(read_texts(resolve_files(paths)))
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'bpe')")


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Load the tokenizer saved in `directory` (char_tokenizer.json or tokenizer.json)."""
    directory = os.fspath(directory)
    char_path = os.path.join(directory, CHAR_FILE)
    bpe_path = os.path.join(directory, BPE_FILE)
    if os.path.isfile(char_path):
        return CharTokenizer.load(char_path)
    if os.path.isfile(bpe_path):
        return BPETokenizer.load(bpe_path)
    raise RunDirError(f"{directory}: no tokenizer found (expected {CHAR_FILE} or {BPE_FILE})")


def load_tokenizer_path(path: str | os.PathLike[str], key: str = "data.tokenizer") -> Tokenizer:
    """A tokenizer named by a path: a `tokenizer.json` (Hugging Face, with the
    `tokenizer_config.json` beside it when there is one), a `char_tokenizer.json`, or a
    directory holding one (`deepseek-tf tokenizer train --out DIR`, a run directory).

    Raises:
        ConfigError: nothing readable at `path` (the message names `key`).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            return load_tokenizer(path)
        except RunDirError:
            raise ConfigError(
                f"{key}: {path} holds no {BPE_FILE} or {CHAR_FILE} (write one with "
                "`deepseek-tf tokenizer train --out DIR`)"
            ) from None
    if not os.path.isfile(path):
        raise ConfigError(
            f"{key}: {path!r} is neither char, bpe nor an existing tokenizer file or directory"
        )
    if os.path.basename(path) == CHAR_FILE:
        return CharTokenizer.load(path)
    return BPETokenizer.load(path)
