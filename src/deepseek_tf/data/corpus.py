"""The training corpus: the bundled default, validated file lists and the train/val split.

Finding and reading the files is `deepseek_tf.text_files` (below the tokenizers, which
train on files too); `expand_files` and `read_texts` are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from deepseek_tf.errors import ConfigError
from deepseek_tf.text_files import decode_text, expand_files, read_bytes, read_texts

__all__ = [
    "CORPUS_FILE",
    "default_corpus_path",
    "expand_files",
    "read_texts",
    "resolve_files",
    "split_point",
    "split_text",
]

CORPUS_FILE = "tinyshakespeare.txt"


def default_corpus_path() -> str:
    """Path of the bundled tiny Shakespeare corpus (1,115,394 characters, 65 distinct)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), CORPUS_FILE)


def resolve_files(patterns: Sequence[str]) -> list[str]:
    """Expand globs into a deterministic file list and validate every file.

    Each pattern's matches are sorted; patterns keep their order; duplicates are dropped.
    An empty `patterns` means the bundled corpus.

    Raises:
        DataError: a pattern with no match, or a file that is missing, a directory,
            empty or not valid UTF-8.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        patterns = [default_corpus_path()]
    files = expand_files(patterns)
    for path in files:
        decode_text(path, read_bytes(path))
    return files


def split_point(num_chars: int, val_fraction: float) -> int:
    """Characters in the train part: the first floor(num_chars * (1 - val_fraction))."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    return int(num_chars * (1.0 - val_fraction))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the first (1 - val_fraction) of the characters, then the rest."""
    n = split_point(len(text), val_fraction)
    return text[:n], text[n:]
