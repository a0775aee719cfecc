"""Streaming text records from `.txt`, `.jsonl` and `.parquet` files.

`iter_records` never holds a whole file: text files are read in ~16 KiB pieces cut at a
line end (an incremental UTF-8 decoder names the byte offset of the first bad byte),
JSON lines one by one, Parquet files one record batch of one column at a time (the
`pyarrow` package, the `[parquet]` extra). A record goes to the validation split by a
hash of its file name and index (`is_validation`), so the split needs no second pass
and does not depend on how many files or workers there are (a corpus of few records may
get none: `prepare` then holds one out, so neither split is empty).

Examples:

>>> import pathlib, tempfile
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "a.jsonl").write_text('{"text": "hi"}\\nnot json\\n{"text": "yo"}\\n')
>>> skipped = {}
>>> [r.text for r in iter_records([d / "a.jsonl"], on_bad_record="skip", skipped=skipped)]
['hi', 'yo']
>>> skipped
{'malformed JSON': 1}
"""

from __future__ import annotations

import codecs
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepseek_tf.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
PIECE_BYTES = 1 << 14  # text files: records of ~16 KiB, cut after a newline
ON_BAD_RECORD = ("fail", "skip")


@dataclass(frozen=True)
class Record:
    text: str
    source: str  # the file's name (its validation hash uses the name, not the folder)
    index: int  # the record's position in its file


def is_validation(record: Record, val_fraction: float) -> bool:
    """True for the ~`val_fraction` of records held out (deterministic per name, index)."""
    key = f"{record.source}:{record.index}".encode()
    return zlib.crc32(key) % 100_000 < round(val_fraction * 100_000)


def _text_pieces(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, pending = 0, ""
    with path.open("rb") as f:
        while True:
            raw = f.read(PIECE_BYTES)
            try:
                text = pending + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not UTF-8 at byte {offset + e.start} ({e.reason}); convert it "
                    "or leave it out"
                ) from None
            offset += len(raw)
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1  # keep lines whole (BPE tokens never span a cut)
            if cut == 0 and len(text) < 64 * PIECE_BYTES:
                pending = text  # a very long line: wait for its end (up to 1 MiB)
                continue
            cut = cut or len(text)
            pending = text[cut:]
            yield text[:cut]


def _bad(path, where: str, problem: str, on_bad_record: str, skipped: dict) -> None:
    if on_bad_record == "fail":
        raise DataError(
            f"{path}:{where}: {problem} (pass --on-bad-record skip to skip such records)"
        )
    kind = problem.split(":")[0]
    skipped[kind] = skipped.get(kind, 0) + 1


def _jsonl_texts(path: Path, field: str, on_bad_record: str, skipped: dict):
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                _bad(path, str(number), "not UTF-8", on_bad_record, skipped)
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(path, str(number), f"malformed JSON: {e.msg}", on_bad_record, skipped)
                continue
            text = item.get(field) if isinstance(item, dict) else None
            if not isinstance(text, str):
                _bad(path, str(number), f"no {field!r} field: a string is needed",
                     on_bad_record, skipped)  # fmt: skip
                continue
            yield text


def _parquet_texts(path: Path, field: str, on_bad_record: str, skipped: dict):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow (pip install 'deepseek-tf[parquet]')"
        ) from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if field not in table.schema_arrow.names:
        raise DataError(f"{path}: no {field!r} column (columns: {table.schema_arrow.names})")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                _bad(path, f"row {row}", f"no {field!r} field: null or not text",
                     on_bad_record, skipped)  # fmt: skip
                continue
            yield text


def iter_records(
    paths: Sequence[str | os.PathLike],
    *,
    text_field: str = "text",
    on_bad_record: str = "fail",
    skipped: dict | None = None,
) -> Iterator[Record]:
    """The text records of `paths`, in order; `skipped` (when given) counts the records
    left out by `on_bad_record="skip"`, by problem."""
    if on_bad_record not in ON_BAD_RECORD:
        raise DataError(f"on_bad_record: {on_bad_record!r} is not one of {ON_BAD_RECORD}")
    skipped = {} if skipped is None else skipped
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            texts = _jsonl_texts(path, text_field, on_bad_record, skipped)
        elif suffix == ".parquet":
            texts = _parquet_texts(path, text_field, on_bad_record, skipped)
        elif suffix == ".txt" or not suffix:
            texts = _text_pieces(path)
        else:
            raise DataError(f"{path}: unknown format {suffix!r} (expected {', '.join(SUFFIXES)})")
        for index, text in enumerate(texts):
            yield Record(text, path.name, index)
