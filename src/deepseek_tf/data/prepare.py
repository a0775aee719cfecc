"""`deepseek-tf data prepare`: corpora larger than memory, tokenized once into shards.

The input files stream through `sources.iter_records` (txt / jsonl / parquet); each
record is tokenized and its ids appended to its split's stream (`sources.is_validation`
picks the split). A stream is cut into TFRecord records of `record_tokens` ids (raw
little-endian uint16, or int32 for vocabularies over 65,536) and into shard files of
about `shard_tokens` ids. Memory holds one record per split, whatever the corpus size.

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


def _write_shards(out: Path, tok: Tokenizer, paths, text_field, on_bad_record, val_fraction,
                  record_tokens, shard_tokens, log):  # fmt: skip
    """Tokenizes the records of `paths` into `out`'s shards; (splits, skipped)."""
    tok.save(out)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, record_tokens, shard_tokens) for s in SPLITS}
    skipped: dict[str, int] = {}
    records = dict.fromkeys(SPLITS, 0)
    eos = tok.eos_id
    for record in iter_records(paths, text_field=text_field, on_bad_record=on_bad_record,
                               skipped=skipped):  # fmt: skip
        split = "val" if val_fraction and is_validation(record, val_fraction) else "train"
        ids = tok.encode_array(record.text)  # (N,)
        if eos is not None and record.source.lower().endswith(DOCUMENT_SUFFIXES):
            ids = np.append(ids, eos)  # documents are separated by EOS
        writers[split].add(ids)
        records[split] += 1
        if log and sum(records.values()) % 10_000 == 0:
            log(f"[prepare] {sum(records.values()):,} records")
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
    """Tokenizes `files` (globs) into shards in the new directory `out`; returns the
    manifest. Raises `InputError` for an existing `out`, `DataError` for unreadable or
    (with `on_bad_record="fail"`) malformed input, naming the file and line."""
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
