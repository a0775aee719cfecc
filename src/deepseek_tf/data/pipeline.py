"""tf.data pipelines yielding (inputs, targets, weights) batches of packed token blocks.

Every file is read, split (train = first 1 - val_fraction of its characters, val = the
rest), tokenized once in-graph and cached. Each training epoch then cuts every file's
tokens into blocks of P + 1 tokens from a random start offset in [0, P) (P =
`packed_length`), keeps this worker's shard and permutes the blocks; the offsets and the
permutation are stateless functions of (data seed, epoch), so the batch sequence is a pure
function of the config and the files, and `start_batch` resumes it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from deepseek_tf.config.schema import DataConfig
from deepseek_tf.data.augment import (
    STREAM_OFFSET,
    STREAM_SHUFFLE,
    augment_batch,
    check_augment_config,
    derive_seed,
    packed_length,
)
from deepseek_tf.data.corpus import read_texts, resolve_files, split_point
from deepseek_tf.data.prepared import (
    check_prepared,
    make_prepared_eval_dataset,
    make_prepared_train_dataset,
)
from deepseek_tf.errors import DataError, TokenizerError
from deepseek_tf.tokenizers.base import Tokenizer

SPLITS = ("train", "val", "all")


def _part(text: str, split: str, val_fraction: float) -> str:
    if split == "all":
        return text
    cut = split_point(len(text), val_fraction)
    return text[:cut] if split == "train" else text[cut:]


def _token_counts(
    files: list[str], tokenizer: Tokenizer, split: str, val_fraction: float
) -> list[int]:
    """Validate the files' characters (a tokenizer with a closed alphabet) and count each
    split part's tokens."""
    parts = []
    for path, text in zip(files, read_texts(files), strict=True):
        unknown = tokenizer.unknown_char(text)
        if unknown is not None:
            pos, char = unknown
            raise TokenizerError(
                f"data file '{path}': character {char!r} at position {pos} is not in "
                f"the {tokenizer.kind} tokenizer's vocabulary"
            )
        parts.append(_part(text, split, val_fraction))
    return tokenizer.count_tokens(parts)


def _check_blocks(
    files: list[str], counts: list[int], split: str, block_len: int, min_blocks: int, need: int
) -> None:
    if min_blocks >= need:
        return
    listed = ", ".join(f"'{f}' has {n} tokens" for f, n in zip(files[:5], counts[:5], strict=False))
    more = f" (+{len(files) - 5} more files)" if len(files) > 5 else ""
    if need <= 1:
        hint = "; raise data.val_fraction, or set train.eval_every=0" if split == "val" else ""
        raise DataError(
            f"data: the {split} split is too short for one block of {block_len} tokens "
            f"(seq_len + 1): {listed}{more}{hint}"
        )
    raise DataError(
        f"data: the {split} split gives only {min_blocks} blocks of {block_len} tokens per "
        f"epoch, fewer than the {need} shards: {listed}{more}"
    )


def _token_dataset(
    files: list[str], tokenizer: Tokenizer, split: str, val_fraction: float
) -> tf.data.Dataset:
    """Dataset of one 1-D int32 token tensor per file (its `split` part)."""
    keep = 1.0 - val_fraction  # same float64 arithmetic as corpus.split_point

    def load(path: tf.Tensor) -> tf.Tensor:
        text = tf.io.read_file(path)
        if split != "all":
            n = tf.strings.length(text, unit="UTF8_CHAR")
            cut = tf.cast(tf.floor(tf.cast(n, tf.float64) * keep), tf.int32)
            if split == "train":
                text = tf.strings.substr(text, 0, cut, unit="UTF8_CHAR")
            else:
                text = tf.strings.substr(text, cut, n - cut, unit="UTF8_CHAR")
        return tokenizer.tf_encode(text)  # (N,) int32

    ds = tf.data.Dataset.from_tensor_slices(files)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _max_offsets(lengths: tf.Tensor, block_len: int, packed: int) -> tf.Tensor:
    """Exclusive upper bound of each file's start offset: the offset stays below `packed`
    and leaves at least one block in a file that has one."""
    return tf.clip_by_value(lengths - block_len + 1, 1, packed)


def _epoch_blocks(
    epoch: tf.Tensor,
    tokens: tf.RaggedTensor,
    *,
    data_cfg: DataConfig,
    block_len: int,
    packed: int,
    num_shards: int,
    shard_index: int,
) -> tf.Tensor:
    """All blocks of one epoch for this shard, permuted: int32 (N, block_len)."""
    lengths = tokens.row_lengths()  # (F,) int64
    max_off = _max_offsets(lengths, block_len, packed)  # (F,)
    draws = tf.random.stateless_uniform(
        tf.shape(lengths),
        seed=derive_seed(data_cfg.seed, STREAM_OFFSET, epoch),
        minval=None,
        maxval=None,
        dtype=tf.int64,
    )  # (F,)
    offsets = tf.math.floormod(draws, max_off)  # (F,) in [0, max_off)
    n_blocks = tf.maximum((lengths - offsets) // block_len, 0)  # (F,)
    k = tf.ragged.range(n_blocks)  # (F, None)
    starts = ((tokens.row_starts() + offsets)[:, None] + k * block_len).flat_values  # (N,)
    starts = starts[shard_index::num_shards]  # (N_shard,)
    starts = tf.random.experimental.stateless_shuffle(
        starts, seed=derive_seed(data_cfg.seed, STREAM_SHUFFLE, epoch)
    )
    index = starts[:, None] + tf.range(block_len, dtype=tf.int64)[None, :]  # (N_shard, L+1)
    return tf.gather(tokens.flat_values, index)  # (N_shard, L+1)


def make_train_dataset(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    *,
    files: Sequence[str] | None = None,
    start_batch: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
) -> tf.data.Dataset:
    """Infinite dataset of (inputs int32 (B, P), targets int32 (B, P), weights float32 (B, P)).

    P = `packed_length(data_cfg)`; targets are inputs shifted by one token. The dataset
    started at `start_batch` yields exactly batches start_batch, start_batch + 1, ... of
    the dataset started at 0. `files=None` uses `data_cfg.files`.
    """
    if batch_size < 1 or start_batch < 0:
        raise ValueError(
            f"need batch_size >= 1 and start_batch >= 0, got {batch_size}, {start_batch}"
        )
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, num_shards={num_shards})")
    if data_cfg.prepared and files is None:  # a `data prepare` directory: streamed
        return make_prepared_train_dataset(
            data_cfg, tokenizer.vocab_size, batch_size, start_batch=start_batch,
            num_shards=num_shards, shard_index=shard_index,
        )  # fmt: skip
    check_augment_config(data_cfg)
    paths = resolve_files(data_cfg.files if files is None else files)
    packed = packed_length(data_cfg)
    block_len = packed + 1
    counts = _token_counts(paths, tokenizer, "train", data_cfg.val_fraction)
    # Blocks per epoch when every file draws its largest offset (see _max_offsets).
    min_blocks = sum(
        max((n - (min(max(n - block_len + 1, 1), packed) - 1)) // block_len, 0) for n in counts
    )
    _check_blocks(paths, counts, "train", block_len, min_blocks, num_shards)

    tokens = _token_dataset(paths, tokenizer, "train", data_cfg.val_fraction)
    tokens = tokens.ragged_batch(len(paths)).cache()  # one element: (F, None), tokenized once

    def epoch_blocks(epoch, toks):
        return _epoch_blocks(
            epoch,
            toks,
            data_cfg=data_cfg,
            block_len=block_len,
            packed=packed,
            num_shards=num_shards,
            shard_index=shard_index,
        )

    vocab_size = tokenizer.vocab_size

    def to_example(batch_index, blocks):
        inputs, targets = blocks[:, :-1], blocks[:, 1:]  # (B, P) each
        inputs, weights = augment_batch(data_cfg, vocab_size, batch_index, inputs)
        return inputs, targets, weights

    # prefetch(1): the next epoch's blocks are cut while this one is consumed.
    ds = tokens.repeat().enumerate().map(epoch_blocks).prefetch(1).unbatch()  # (L+1,) blocks
    ds = ds.skip(start_batch * batch_size).batch(batch_size, drop_remainder=True)
    ds = ds.enumerate(start=start_batch)
    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def next_batch(iterator):
    """The iterator's next batch; unreadable data (a corrupt or truncated shard of a
    prepared directory) is a one-line `DataError`, not a TensorFlow traceback."""
    try:
        return next(iterator)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        first = (e.message or type(e).__name__).strip().splitlines()[0][:200]
        raise DataError(
            f"training data could not be read ({first}); if it is a prepared directory, "
            "prepare it again"
        ) from None


def make_step_dataset(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    *,
    accumulation: int = 1,
    start_step: int = 0,
    num_shards: int = 1,
    shard_index: int = 0,
) -> tf.data.Dataset:
    """What one optimizer step consumes: `(B, P)` batches, or with gradient accumulation
    `(A, B, P)` stacks of `A` micro-batches; starts at step `start_step` (exactly where a
    run that stopped after `start_step` steps left off)."""
    ds = make_train_dataset(
        data_cfg,
        tokenizer,
        batch_size,
        start_batch=start_step * accumulation,
        num_shards=num_shards,
        shard_index=shard_index,
    )
    if accumulation > 1:
        ds = ds.batch(accumulation, drop_remainder=True)  # (A, B, P)
    return ds


def check_validation_data(data_cfg: DataConfig, tokenizer: Tokenizer) -> None:
    """Raises a one-line `DataError` unless the validation split gives at least one
    sequence of `seq_len + 1` tokens: a run that evaluates checks it before step 1.

    A prepared directory is checked from its manifest (`check_prepared`); files are read
    and their validation parts tokenized (what `make_eval_dataset` does first anyway).

    Args:
        data_cfg: the data section (`prepared`, or `files` with `val_fraction`).
        tokenizer: the run's tokenizer.
    """
    if data_cfg.prepared:
        check_prepared(data_cfg.prepared, need_val=True, seq_len=data_cfg.seq_len)
        return
    paths = resolve_files(data_cfg.files)
    block_len = data_cfg.seq_len + 1
    counts = _token_counts(paths, tokenizer, "val", data_cfg.val_fraction)
    _check_blocks(paths, counts, "val", block_len, sum(n // block_len for n in counts), 1)


def make_eval_dataset(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    *,
    files: Sequence[str] | None = None,
    split: str = "val",
) -> tf.data.Dataset:
    """Finite dataset of (inputs, targets, weights) batches of seq_len tokens, in file order.

    split "val": the held-out tail of every file; "train": the rest; "all": whole files.
    Blocks start at offset 0; the last partial batch is kept; weights are all 1.0.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if data_cfg.prepared and files is None and split != "all":
        return make_prepared_eval_dataset(data_cfg, batch_size, split)
    check_augment_config(data_cfg)
    paths = resolve_files(data_cfg.files if files is None else files)
    block_len = data_cfg.seq_len + 1
    counts = _token_counts(paths, tokenizer, split, data_cfg.val_fraction)
    _check_blocks(paths, counts, split, block_len, sum(n // block_len for n in counts), 1)

    def to_blocks(tokens):
        n = tf.shape(tokens)[0] // block_len * block_len
        return tf.reshape(tokens[:n], (-1, block_len))  # (N, T+1)

    def to_example(blocks):
        inputs, targets = blocks[:, :-1], blocks[:, 1:]  # (B, T) each
        return inputs, targets, tf.ones(tf.shape(inputs), tf.float32)

    ds = _token_dataset(paths, tokenizer, split, data_cfg.val_fraction)
    ds = ds.map(to_blocks).cache().unbatch().batch(batch_size)
    ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
