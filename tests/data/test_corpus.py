"""Corpus discovery, validation and the 90/10 split."""

from __future__ import annotations

import os

import pytest

from deepseek_tf.data.corpus import (
    default_corpus_path,
    read_texts,
    resolve_files,
    split_point,
    split_text,
)
from deepseek_tf.errors import ConfigError, DataError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_default_corpus_is_bundled_tiny_shakespeare():
    path = default_corpus_path()
    assert os.path.isfile(path)
    assert resolve_files([]) == [path]
    (text,) = read_texts([path])
    assert len(text) == 1_115_394
    assert len(set(text)) == 65


def test_split_of_bundled_corpus_matches_nanogpt():
    (text,) = read_texts(resolve_files([]))
    train, val = split_text(text, 0.1)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert train + val == text


def test_split_text_is_head_and_tail():
    assert split_text("abcdefghij", 0.3) == ("abcdefg", "hij")
    assert split_text("abc", 0.0) == ("abc", "")
    assert split_point(7, 0.5) == 3  # floor
    with pytest.raises(ConfigError, match="val_fraction"):
        split_text("abc", 1.0)


def test_globs_expand_sorted_and_deduplicated(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(f"text of {name}\n", encoding="utf-8")
    (tmp_path / "sub.txt").mkdir()  # directories matching a glob are skipped
    files = resolve_files([str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path / "*")])
    names = [os.path.basename(f) for f in files]
    assert names == ["a.txt", "b.txt", "c.md"]
    assert read_texts(files)[0] == "text of a.txt\n"


def test_glob_without_match_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(DataError) as exc:
        resolve_files([pattern])
    assert _one_line(exc) == f"data.files: no file matches '{pattern}'"


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "missing.txt")
    with pytest.raises(DataError) as exc:
        resolve_files([path])
    assert path in _one_line(exc)
    assert "does not exist" in str(exc.value)


def test_directory_is_not_a_text_file(tmp_path):
    with pytest.raises(DataError) as exc:
        resolve_files([str(tmp_path)])
    assert str(tmp_path) in _one_line(exc)


def test_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError) as exc:
        resolve_files([str(tmp_path / "*.txt")])
    assert str(path) in _one_line(exc)
    assert "empty" in str(exc.value)


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ol\u00e9".encode("latin-1"))  # 0xE9 at byte 3
    with pytest.raises(DataError) as exc:
        resolve_files([str(path)])
    message = _one_line(exc)
    assert str(path) in message
    assert "UTF-8" in message
    assert "byte offset 3" in message


def test_read_texts_keeps_bytes_exactly(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("line one\r\nline \u00e9\r\n".encode())
    assert read_texts([str(path)]) == ["line one\r\nline \u00e9\r\n"]


def test_existing_file_with_glob_characters_is_taken_literally(tmp_path):
    path = tmp_path / "part[1].txt"
    path.write_text("literal\n", encoding="utf-8")
    assert resolve_files([str(path)]) == [str(path)]
