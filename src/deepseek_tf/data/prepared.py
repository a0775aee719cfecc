"""Training and validation datasets streamed from a `data prepare` directory.

The brief's input pipeline (section 2.1): shard files -> `interleave` of
`TFRecordDataset`s -> `map` (ids -> blocks of seq_len + 1 from a random offset) ->
`shuffle` buffer -> `batch` -> `prefetch`, with the shard files split between workers.
Nothing is read whole: memory holds the interleaved records, the shuffle buffer and the
prefetched batches. Every shuffle and offset draws from `data.seed` (file order and the
buffer reshuffle each pass; offsets are stateless in the record's position), so the
stream is the same in every run, and a run resumed after N batches skips exactly N
batches of it (`start_batch`, reading through them: ~seconds per 100M tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from deepseek_tf.config.schema import DataConfig
from deepseek_tf.data.augment import augment_batch, check_augment_config, packed_length
from deepseek_tf.data.prepare import FORMAT, MANIFEST
from deepseek_tf.errors import DataError

SHUFFLE_BLOCKS = 8192  # the shuffle buffer, in blocks (8192 x 257 int32 ids = 8 MiB)
CYCLE = 4  # shard files read at once


def read_manifest(directory) -> dict:
    """The manifest of a prepared directory, checked: one-line `DataError`s name the
    directory and what is wrong (missing, not JSON, another format, no training shards,
    a shard file gone)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(
            f"data.prepared: {directory} has no {MANIFEST} (write it with `deepseek-tf data "
            "prepare --out DIR`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"data.prepared: {path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"data.prepared: {path} is not a {FORMAT!r} manifest")
    splits = manifest.get("splits") or {}
    if not (splits.get("train") or {}).get("shards"):
        raise DataError(f"data.prepared: {path} lists no training shards (an empty manifest)")
    for split in splits.values():
        for shard in split.get("shards", []):
            if not (directory / shard["file"]).is_file():
                raise DataError(f"data.prepared: shard {shard['file']} of {path} is missing")
    return manifest


def eval_blocks(manifest: dict, split: str, seq_len: int) -> int:
    """Sequences of `seq_len + 1` tokens that `split` gives for evaluation (blocks are cut
    from each record's start; every record holds `record_tokens` ids but the last)."""
    tokens = int((manifest["splits"].get(split) or {}).get("tokens", 0))
    record, block = int(manifest["record_tokens"]), seq_len + 1
    return tokens // record * (record // block) + tokens % record // block


def check_prepared(directory, *, need_val: bool, seq_len: int = 0) -> dict:
    """Checks, from the manifest alone (no shard is read), that a prepared directory can
    train: before step 1 rather than at the first evaluation.

    Args:
        directory: the `data prepare` directory (`data.prepared`).
        need_val: the run evaluates (`train.eval_every > 0`): the validation split must
            hold tokens.
        seq_len: when > 0, the validation split must also give one sequence of
            `seq_len + 1` tokens.

    Returns:
        The manifest (`read_manifest`).

    Raises a one-line `DataError` naming the directory and the remedy.

    Examples:

    >>> import pathlib, tempfile
    >>> from deepseek_tf.data.prepare import prepare
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("to be or not to be\\n" * 50)
    >>> _ = prepare([str(d / "a.txt")], "char", d / "p", val_fraction=0.0, log=None)
    >>> check_prepared(d / "p", need_val=True)
    Traceback (most recent call last):
    ...
    deepseek_tf.errors.DataError: data.prepared: ... has no validation tokens (prepared with ...
    """
    manifest = read_manifest(directory)
    if not need_val:
        return manifest
    tokens = int((manifest["splits"].get("val") or {}).get("tokens", 0))
    fraction = manifest.get("val_fraction", 0)
    if not tokens:
        why = (
            "prepared with --val-fraction 0"
            if not fraction
            else f"an older `data prepare` gave --val-fraction {fraction:g} none"
        )
        raise DataError(
            f"data.prepared: {directory} has no validation tokens ({why}); prepare it again "
            "with --val-fraction 0.1 (or more), or train with train.eval_every=0"
        )
    if seq_len > 0 and not eval_blocks(manifest, "val", seq_len):
        raise DataError(
            f"data.prepared: the validation split of {directory} has {tokens} tokens, fewer "
            f"than one sequence of {seq_len + 1} (data.seq_len + 1); prepare it again with a "
            "larger --val-fraction, or train with train.eval_every=0"
        )
    return manifest


def _files(directory, manifest: dict, split: str) -> list[str]:
    shards = manifest["splits"].get(split, {}).get("shards", [])
    return [str(Path(directory) / s["file"]) for s in shards]


def _decoder(manifest: dict):
    dtype = {"uint16": tf.uint16, "int32": tf.int32}[manifest["dtype"]]

    def decode(record):
        return tf.cast(tf.io.decode_raw(record, dtype, little_endian=True), tf.int32)  # (N,)

    return decode


def make_prepared_train_dataset(
    data_cfg: DataConfig,
    vocab_size: int,
    batch_size: int,
    *,
    start_batch: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
) -> tf.data.Dataset:
    """Infinite (inputs, targets, weights) batches of `packed_length` tokens from
    `data_cfg.prepared`; started at `start_batch` it yields exactly batches
    start_batch, start_batch + 1, ... of the dataset started at 0."""
    check_augment_config(data_cfg)
    manifest = read_manifest(data_cfg.prepared)
    files = _files(data_cfg.prepared, manifest, "train")
    block_len = packed_length(data_cfg) + 1
    if manifest["record_tokens"] < 2 * block_len:
        raise DataError(
            f"data.prepared: records of {manifest['record_tokens']} tokens are too short for "
            f"sequences of {block_len - 1} (prepare with --record-tokens >= {2 * block_len})"
        )
    seed, decode = data_cfg.seed, _decoder(manifest)
    ds = tf.data.Dataset.from_tensor_slices(files)
    by_file = len(files) >= num_shards > 1
    if by_file:  # each worker reads its own shard files
        ds = ds.shard(num_shards, shard_index)
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(CYCLE, len(files)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)  # fmt: skip

    def to_blocks(index, record):
        ids = decode(record)  # (N,)
        offset = tf.random.stateless_uniform(
            (), seed=tf.stack([tf.cast(seed, tf.int64), index]), maxval=block_len, dtype=tf.int64
        )
        ids = ids[tf.cast(offset, tf.int32) :]
        n = tf.shape(ids)[0] // block_len * block_len
        return tf.reshape(ids[:n], (-1, block_len))  # (N / (P + 1), P + 1)

    ds = ds.enumerate().map(to_blocks, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.unbatch()  # (P + 1,) blocks
    if num_shards > 1 and not by_file:  # fewer files than workers: every k-th block
        ds = ds.shard(num_shards, shard_index)
    ds = ds.shuffle(SHUFFLE_BLOCKS, seed=seed + 1, reshuffle_each_iteration=True)
    ds = ds.skip(start_batch * batch_size).batch(batch_size, drop_remainder=True)

    def to_example(batch_index, blocks):
        inputs, targets = blocks[:, :-1], blocks[:, 1:]  # (B, P) each
        inputs, weights = augment_batch(data_cfg, vocab_size, batch_index, inputs)
        return inputs, targets, weights

    ds = ds.enumerate(start=start_batch)
    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_prepared_eval_dataset(data_cfg: DataConfig, batch_size: int, split: str = "val"):
    """Finite (inputs, targets, weights) batches of the prepared `split`, in order, blocks
    from each record's start (as the in-memory validation split is cut)."""
    manifest = check_prepared(data_cfg.prepared, need_val=split == "val", seq_len=data_cfg.seq_len)
    files = _files(data_cfg.prepared, manifest, split)
    block_len, decode = data_cfg.seq_len + 1, _decoder(manifest)

    def to_blocks(record):
        ids = decode(record)
        n = tf.shape(ids)[0] // block_len * block_len
        return tf.reshape(ids[:n], (-1, block_len))  # (N, T + 1)

    def to_example(blocks):
        inputs, targets = blocks[:, :-1], blocks[:, 1:]  # (B, T) each
        return inputs, targets, tf.ones(tf.shape(inputs), tf.float32)

    ds = tf.data.TFRecordDataset(files).map(to_blocks).unbatch().batch(batch_size)
    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
