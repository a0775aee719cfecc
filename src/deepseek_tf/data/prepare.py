"""`deepseek-tf data prepare`: corpora larger than memory, tokenized once into shards.

The input files stream through `sources.iter_records` (txt / jsonl / parquet); each
record is tokenized and its ids appended to its split's stream (`sources.is_validation`
picks the split). A stream is cut into TFRecord records of `record_tokens` ids (raw
little-endian uint16, or int32 for vocabularies over 65,536) and into shard files of
about `shard_tokens` ids. Memory holds one record per split, whatever the corpus size.

With `val_fraction > 0` the validation split is never empty. The hash picks ~that
fraction of the records, but a small corpus has few records (a text file is cut into
records of ~16 KiB: 213 KB of text is 13 records, and one file name in four gets none
of them at 0.1), so until the first validation record arrives the longest training
record so far is held back (one more record in memory). If none arrives, that record
becomes the validation split; a corpus of a single record gives the last `val_fraction`
of its tokens; fewer than two tokens cannot be split (a one-line `DataError` naming
`--val-fraction`). Whether the split is long enough for the model's sequences is
`prepared.check_prepared`'s question, asked before training starts.

The output directory is self-describing: `manifest.json` (format, tokenizer, dtype,
shards and their token counts, skipped records) and the tokenizer's file(s), so
`data.prepared: DIR` is all a training config needs (see `prepared.py`).

Examples:

>>> import pathlib, tempfile
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "a.txt").write_text("to be or not to be\\n" * 200)
>>> m = prepare([str(d / "a.txt")], "char", d / "prepared", val_fraction=0.0, log=None)
>>> m["splits"]["train"]["tokens"], m["vocab_size"]
(3800, 8)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import tensorflow as tf

from deepseek_tf.config.schema import TOKENIZER_TYPES
from deepseek_tf.data.corpus import expand_files
from deepseek_tf.data.sources import is_validation, iter_records
from deepseek_tf.errors import DataError, InputError
from deepseek_tf.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer_path

FORMAT = "deepseek-tf prepared v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DOCUMENT_SUFFIXES = (".jsonl", ".parquet")  # one document a record: EOS between them


def token_dtype(vocab_size: int):
    """uint16 ids when the vocabulary fits (half the bytes), else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


class ShardWriter:
    """One split's token stream, cut into records of `record_tokens` ids and shard
    files of about `shard_tokens` ids (a shard ends after the record that fills it)."""

    def __init__(self, out: Path, split: str, dtype, record_tokens: int, shard_tokens: int):
        self.out, self.split, self.dtype = out, split, np.dtype(dtype).newbyteorder("<")
        self.record_tokens, self.shard_tokens = record_tokens, shard_tokens
        self.shards: list[dict] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._writer = None

    @property
    def tokens(self) -> int:
        """Ids added so far (written or buffered)."""
        return sum(s["tokens"] for s in self.shards) + self._buffered

    def add(self, ids: Iterable[int]) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        self._buffer.append(ids)
        self._buffered += ids.size
        while self._buffered >= self.record_tokens:
            stream = np.concatenate(self._buffer)  # (N,)
            self._write(stream[: self.record_tokens])
            rest = stream[self.record_tokens :]
            self._buffer, self._buffered = [rest], rest.size

    def _write(self, record: np.ndarray) -> None:
        if self._writer is None:
            name = f"{self.split}-{len(self.shards):05d}.tfrecord"
            self._writer = tf.io.TFRecordWriter(str(self.out / name))
            self.shards.append({"file": name, "tokens": 0, "records": 0})
        self._writer.write(record.tobytes())
        shard = self.shards[-1]
        shard["tokens"] += int(record.size)
        shard["records"] += 1
        if shard["tokens"] >= self.shard_tokens:
            self._writer.close()
            self._writer = None

    def close(self) -> dict:
        if self._buffered:
            self._write(np.concatenate(self._buffer))  # the last, shorter record
        if self._writer is not None:
            self._writer.close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def _tokenizer(spec: str, paths, text_field: str, vocab_size: int) -> Tokenizer:
    """`spec`: a run or tokenizer directory, a tokenizer file, or char / bpe trained on
    the inputs' train records (one streaming pass)."""
    if spec not in TOKENIZER_TYPES:
        return load_tokenizer_path(spec, key="--tokenizer")
    records = iter_records(paths, text_field=text_field, on_bad_record="skip")
    if next((r for r in records if r.text), None) is None:  # stops at the first text
        raise DataError(f"{', '.join(paths)}: no training text (every record empty or skipped)")
    texts = (r.text for r in iter_records(paths, text_field=text_field, on_bad_record="skip"))
    if spec == "char":
        return CharTokenizer.train(texts)
    return BPETokenizer.train(texts, vocab_size)


class _Splits:
    """The two splits' writers. With a validation split asked for, neither split is left
    empty: until the other split holds tokens, each split keeps its longest record back
    (one record each in memory); `finish` gives a held record to the empty split."""

    def __init__(self, writers: dict[str, ShardWriter], val_fraction: float, records: dict):
        self.writers, self.val_fraction, self.records = writers, val_fraction, records
        self.held: dict[str, np.ndarray | None] = dict.fromkeys(SPLITS)

    def add(self, split: str, ids: np.ndarray) -> None:
        other, held = _OTHER[split], self.held[split]
        may_hold = self.val_fraction and not self.writers[other].tokens
        if may_hold and ids.size > (0 if held is None else held.size):
            self.held[split], ids = ids, held  # the longest record so far waits
        if ids is not None:
            self.writers[split].add(ids)
        for s in ("train", "val", "train"):  # a split that now has tokens frees the other's
            if self.held[s] is not None and self.writers[_OTHER[s]].tokens:
                self.writers[s].add(self.held[s])
                self.held[s] = None

    def finish(self, paths, log) -> None:
        """Places the held records: each in its own split when both hold one, else the held
        record goes to the empty split, or is cut in two when it is the whole corpus."""
        held = {s: ids for s, ids in self.held.items() if ids is not None}
        if len(held) != 1:
            for split, ids in held.items():
                self.writers[split].add(ids)
            return
        ((split, ids),) = held.items()
        other = _OTHER[split]
        if self.writers[split].tokens:  # the split keeps other records: move this one
            self.writers[other].add(ids)
            self.records[split] -= 1
            where = f"a record of {ids.size:,} tokens"
        else:  # the corpus is one record: its tail is the validation split
            cut = ids.size - max(1, round(ids.size * self.val_fraction))
            if cut < 1:
                raise DataError(
                    f"{', '.join(paths)}: {ids.size} token(s) are too few to split for "
                    "validation (add text, or pass --val-fraction 0)"
                )
            self.writers["train"].add(ids[:cut])
            self.writers["val"].add(ids[cut:])
            part = (ids.size - cut, "last") if other == "val" else (cut, "first")
            where = f"the {part[1]} {part[0]:,} tokens of the only record"
        self.records[other] += 1
        if log:
            log(f"[prepare] the hash gave the {other} split no record; it holds {where}")


_OTHER = {"train": "val", "val": "train"}


def _write_shards(out: Path, tok: Tokenizer, paths, text_field, on_bad_record, val_fraction,
                  record_tokens, shard_tokens, log):  # fmt: skip
    """Tokenizes the records of `paths` into `out`'s shards; (splits, skipped)."""
    tok.save(out)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, record_tokens, shard_tokens) for s in SPLITS}
    skipped: dict[str, int] = {}
    records = dict.fromkeys(SPLITS, 0)
    streams = _Splits(writers, val_fraction, records)
    eos = tok.eos_id
    for record in iter_records(paths, text_field=text_field, on_bad_record=on_bad_record,
                               skipped=skipped):  # fmt: skip
        split = "val" if val_fraction and is_validation(record, val_fraction) else "train"
        ids = tok.encode_array(record.text)  # (N,)
        if eos is not None and record.source.lower().endswith(DOCUMENT_SUFFIXES):
            ids = np.append(ids, eos)  # documents are separated by EOS
        streams.add(split, ids)
        records[split] += 1
        if log and sum(records.values()) % 10_000 == 0:
            log(f"[prepare] {sum(records.values()):,} records")
    streams.finish(paths, log)
    splits = {s: {**w.close(), "records": records[s]} for s, w in writers.items()}
    if not splits["train"]["tokens"]:
        raise DataError(f"{', '.join(paths)}: no training text (every record empty or skipped)")
    return splits, skipped


def prepare(
    files,
    tokenizer: str,
    out,
    *,
    vocab_size: int = 4096,
    text_field: str = "text",
    on_bad_record: str = "fail",
    val_fraction: float = 0.1,
    record_tokens: int = 1 << 16,
    shard_tokens: int = 1 << 26,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Tokenizes `files` (globs) into shards in the new directory `out`.

    Args:
        files: input files or globs (.txt, .jsonl, .parquet).
        tokenizer: `char` or `bpe` (trained on the inputs), or a run / tokenizer path.
        out: the new directory (written beside it and renamed at the end).
        vocab_size: `bpe`'s target vocabulary.
        text_field: the text field of .jsonl / .parquet records.
        on_bad_record: `fail` (naming the file and line) or `skip` (counted).
        val_fraction: the share of records held out for validation; when above 0 the
            validation split is never empty (see the module docstring).
        record_tokens, shard_tokens: ids per TFRecord record, and per shard file (about).
        log: progress printer (`None`: quiet).

    Returns:
        The manifest (`manifest.json`): `splits[train|val]` with `tokens`, `records` and
        `shards`, `vocab_size`, `dtype`, `skipped`, ...

    Raises `InputError` for an existing `out` or a bad option, `DataError` for unreadable
    or (with `on_bad_record="fail"`) malformed input, naming the file and line, or for a
    corpus too small to split.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} already exists and is not empty")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction: must be in [0, 1), got {val_fraction}")
    if record_tokens < 2 or shard_tokens < record_tokens:
        raise InputError("need record_tokens >= 2 and shard_tokens >= record_tokens")
    paths = expand_files(files)
    started = time.perf_counter()
    tok = _tokenizer(tokenizer, paths, text_field, vocab_size)
    # written beside `out` and renamed at the end: a failure leaves no half directory
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        splits, skipped = _write_shards(partial, tok, paths, text_field, on_bad_record,
                                        val_fraction, record_tokens, shard_tokens, log)  # fmt: skip
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest = {
        "format": FORMAT,
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "record_tokens": record_tokens,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "inputs": [os.path.abspath(p) for p in paths],
        "skipped": skipped,
        "splits": splits,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    if log:
        counts = ", ".join(f"{s} {v['tokens']:,} tokens in {len(v['shards'])} shard(s)"
                           for s, v in splits.items())  # fmt: skip
        extra = f"; skipped {skipped}" if skipped else ""
        log(f"[prepare] {out}: {counts} ({tok.kind} tokenizer, vocab {tok.vocab_size}){extra}")
    return manifest
