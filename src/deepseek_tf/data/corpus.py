"""Locating, validating and reading the UTF-8 text corpus."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from deepseek_tf.errors import ConfigError, DataError

CORPUS_FILE = "tinyshakespeare.txt"


def default_corpus_path() -> str:
    """Path of the bundled tiny Shakespeare corpus (1,115,394 characters, 65 distinct)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), CORPUS_FILE)


def _expand(pattern: str) -> list[str]:
    if os.path.isfile(pattern):  # an existing file is taken literally, even "a[1].txt"
        return [pattern]
    if not glob.has_magic(pattern):
        if os.path.isdir(pattern):
            raise DataError(f"data file '{pattern}' is a directory, not a text file")
        if not os.path.exists(pattern):
            raise DataError(f"data file '{pattern}' does not exist")
        # a device (/dev/zero), a FIFO or a socket: reading may never end
        raise DataError(f"data file '{pattern}' is not a regular file")
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise DataError(f"data.files: no file matches '{pattern}'")
    return matches


def _decode(path: str, raw: bytes) -> str:
    if not raw:
        raise DataError(f"data file '{path}' is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not valid UTF-8 (byte offset {e.start})") from None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"data file '{path}' cannot be read ({e.strerror})") from None


def expand_files(patterns: Sequence[str]) -> list[str]:
    """`resolve_files` without reading the files: globs expanded (sorted per pattern,
    duplicates dropped), missing files and directories refused."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for path in _expand(os.fspath(pattern)):
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def resolve_files(patterns: Sequence[str]) -> list[str]:
    """Expand globs into a deterministic file list and validate every file.

    Each pattern's matches are sorted; patterns keep their order; duplicates are dropped.
    An empty `patterns` means the bundled corpus. Raises DataError for a pattern with no
    match or a file that is missing, a directory, empty or not valid UTF-8.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        patterns = [default_corpus_path()]
    files = expand_files(patterns)
    for path in files:
        _decode(path, _read_bytes(path))
    return files


def read_texts(files: Sequence[str]) -> list[str]:
    """The decoded text of every file, exactly as stored (no newline translation)."""
    return [_decode(path, _read_bytes(path)) for path in files]


def split_point(num_chars: int, val_fraction: float) -> int:
    """Characters in the train part: the first floor(num_chars * (1 - val_fraction))."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    return int(num_chars * (1.0 - val_fraction))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the first (1 - val_fraction) of the characters, then the rest."""
    n = split_point(len(text), val_fraction)
    return text[:n], text[n:]
