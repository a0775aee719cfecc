"""Finding and reading UTF-8 text files: globs expanded, every failure a one-line error.

The bottom of the package (it imports only `errors`): tokenizers train on files with it
and `data.corpus` builds the training corpus on it. A missing file, a directory, an empty
file or one that is not valid UTF-8 is a `DataError` naming the file.

Examples:

>>> from deepseek_tf.text_files import expand_files
>>> expand_files(["no/such/file.txt"])
Traceback (most recent call last):
...
deepseek_tf.errors.DataError: data file 'no/such/file.txt' does not exist
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from deepseek_tf.errors import DataError


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


def decode_text(path: str, raw: bytes) -> str:
    """`raw` (the bytes of file `path`) as text; empty or non-UTF-8 is a `DataError`."""
    if not raw:
        raise DataError(f"data file '{path}' is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not valid UTF-8 (byte offset {e.start})") from None


def read_bytes(path: str) -> bytes:
    """The bytes of file `path`; an unreadable file is a `DataError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"data file '{path}' cannot be read ({e.strerror})") from None


def expand_files(patterns: Sequence[str | os.PathLike[str]] | str) -> list[str]:
    """Files named by `patterns`, without reading them.

    Args:
        patterns: file names and globs (`**` recursive), or one of them.

    Returns:
        The files: each pattern's matches sorted, patterns in order, duplicates dropped.

    Raises:
        DataError: a pattern without a match, a missing file, a directory.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in [patterns] if isinstance(patterns, (str, os.PathLike)) else patterns:
        for path in _expand(os.fspath(pattern)):
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def read_texts(files: Sequence[str]) -> list[str]:
    """The decoded text of every file, exactly as stored (no newline translation).

    Raises:
        DataError: a file that cannot be read, is empty or is not valid UTF-8.
    """
    return [decode_text(path, read_bytes(path)) for path in files]
