"""Tokenizers: character-level and byte-level BPE behind one interface."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence

from deepseek_tf.errors import ConfigError, DataError, RunDirError, TokenizerError
from deepseek_tf.text_files import expand_files, read_texts
from deepseek_tf.tokenizers.base import BPE_FILE, CHAR_FILE, EOS_TOKEN, Tokenizer, stderr_line
from deepseek_tf.tokenizers.bpe import MAX_BPE_VOCAB, MIN_BPE_VOCAB, BPETokenizer
from deepseek_tf.tokenizers.char import CharTokenizer

__all__ = [
    "BPE_FILE",
    "CHAR_FILE",
    "EOS_TOKEN",
    "MAX_BPE_VOCAB",
    "MIN_BPE_VOCAB",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "load_tokenizer_path",
    "train_tokenizer",
]

TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BPETokenizer}


def train_tokenizer(
    kind: str,
    *,
    texts: Iterable[str] | str | None = None,
    files: Sequence[str | os.PathLike[str]] | str | os.PathLike[str] | None = None,
    vocab_size: int = 4096,
    log: Callable[[str], None] | None = stderr_line,
) -> Tokenizer:
    """Trains a tokenizer of `kind` on texts and/or files.

    Args:
        kind: `"char"` (one id per character seen) or `"bpe"` (byte-level BPE).
        texts: training texts (an iterable: a generator streams; one `str` is one text).
        files: text files or globs (one path or a sequence), read as UTF-8 after `texts`.
        vocab_size: the bpe target, in [`MIN_BPE_VOCAB`, `MAX_BPE_VOCAB`]; ignored for
            char, whose vocabulary is the set of characters seen. A bpe vocabulary that
            stops short of it (too little text) is said in one warning line.
        log: where that warning goes (default stderr; None: nowhere).

    Returns:
        The trained tokenizer.

    Raises:
        TokenizerError: an unknown `kind`.
        ConfigError: `vocab_size` out of range (checked before any file is read).
        DataError: a file missing, empty or not UTF-8; no text given at all.

    Examples:
    >>> train_tokenizer("char", texts=["hello"]).vocab_size
    4
    >>> train_tokenizer("char", files=["corpus/*.txt"])  # doctest: +SKIP
    """
    cls = TOKENIZER_KINDS.get(kind)
    if cls is None:
        raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'bpe')")
    cls.check_vocab_size(vocab_size)
    if texts is None and files is None:
        raise DataError("train_tokenizer: no training text (give texts= or files=)")
    if files is not None and not isinstance(files, (str, os.PathLike)) and not files:
        raise DataError("train_tokenizer: files= is empty")
    sources: list[Iterable[str]] = []
    if texts is not None:
        sources.append([texts] if isinstance(texts, str) else texts)
    if files is not None:
        sources.append(read_texts(expand_files(files)))
    return cls.train(itertools.chain.from_iterable(sources), vocab_size, log=log or _silent)


def _silent(message: str) -> None:
    """A `log` that drops the message."""


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
