"""Train/eval tf.data pipelines.

Most tests use a corpus of distinct CJK characters: with a char tokenizer, the id of a
token is then its character position in the corpus, so every block says where it came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.schema import DataConfig
from deepseek_tf.data.corpus import default_corpus_path, read_texts, split_text
from deepseek_tf.data.pipeline import make_eval_dataset, make_train_dataset
from deepseek_tf.errors import DataError, TokenizerError
from deepseek_tf.tokenizers import train_tokenizer

N = 600  # characters per file
T = 8  # seq_len
B = 4


def _positions_corpus(tmp_path, num_files=1):
    """Files of distinct characters; returns (glob, char tokenizer, per-file texts)."""
    texts = []
    for f in range(num_files):
        text = "".join(chr(0x4E00 + f * N + i) for i in range(N))
        (tmp_path / f"part{f}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    tok = train_tokenizer("char", texts=texts)  # sorted => id == global position
    return str(tmp_path / "part*.txt"), tok, texts


def _cfg(pattern, **kw):
    return DataConfig(**{"files": (pattern,), "seq_len": T, "val_fraction": 0.2, "seed": 7, **kw})


def _take(ds, n):
    return [tuple(t.numpy() for t in batch) for batch in ds.take(n)]


def test_shapes_dtypes_and_next_token_targets(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path)
    ds = make_train_dataset(_cfg(pattern), tok, B)
    specs = ds.element_spec
    assert [s.shape.as_list() for s in specs] == [[B, T]] * 3
    assert [s.dtype for s in specs] == [tf.int32, tf.int32, tf.float32]
    for inputs, targets, weights in _take(ds, 30):
        np.testing.assert_array_equal(targets, inputs + 1)  # ids are positions
        np.testing.assert_array_equal(weights, np.ones((B, T), np.float32))
        assert inputs.max() < int(N * 0.8)  # train part only


def test_offsets_change_between_epochs_and_epochs_cover_the_split(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path)
    batches = _take(make_train_dataset(_cfg(pattern), tok, B), 120)  # ~9 epochs
    starts = np.concatenate([inputs[:, 0] for inputs, _, _ in batches])
    assert len(set((starts % (T + 1)).tolist())) > 1  # one residue per epoch's offset
    first_epoch = starts[: (480 - T) // (T + 1)]  # shorter than any epoch
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no block twice
    assert len(set((first_epoch % (T + 1)).tolist())) == 1
    assert not np.all(np.diff(first_epoch) > 0)  # shuffled


def test_same_seed_same_batches_other_seed_differs(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path)
    a = _take(make_train_dataset(_cfg(pattern), tok, B), 5)
    b = _take(make_train_dataset(_cfg(pattern), tok, B), 5)
    c = _take(make_train_dataset(_cfg(pattern, seed=8), tok, B), 5)
    np.testing.assert_array_equal(np.stack([x[0] for x in a]), np.stack([x[0] for x in b]))
    assert not np.array_equal(np.stack([x[0] for x in a]), np.stack([x[0] for x in c]))


def test_resume_with_start_batch_reproduces_batches(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path, num_files=2)
    cfg = _cfg(pattern, token_replace=True, token_replace_prob=0.2, length_jitter=True)
    full = _take(make_train_dataset(cfg, tok, B), 60)  # ~24 batches per epoch
    k = 23
    resumed = _take(make_train_dataset(cfg, tok, B, start_batch=k), 60 - k)
    for want, got in zip(full[k:], resumed, strict=True):
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(w, g)


def test_shards_are_disjoint(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path, num_files=2)
    cfg = _cfg(pattern)
    # 2 files x 480 train tokens: >= 104 blocks per epoch, >= 52 per shard; 10 batches of
    # 4 stay inside epoch 0.
    shards = [
        _take(make_train_dataset(cfg, tok, B, num_shards=2, shard_index=s), 10) for s in (0, 1)
    ]
    seen = [set(np.concatenate([x[0].ravel() for x in batches]).tolist()) for batches in shards]
    assert len(seen[0]) == len(seen[1]) == 10 * B * T
    assert seen[0].isdisjoint(seen[1])


def test_too_many_shards_for_the_data_is_an_error(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path)
    with pytest.raises(DataError, match="fewer than the 100 shards"):
        make_train_dataset(_cfg(pattern), tok, B, num_shards=100)


def test_val_split_is_exactly_the_tail_of_every_file(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path, num_files=2)
    batches = _take(make_eval_dataset(_cfg(pattern), tok, 5), 100)
    inputs = np.concatenate([x[0] for x in batches])
    cut = int(N * 0.8)
    per_file = (N - cut) // (T + 1)  # 13 blocks from the 120-char tail
    assert len(inputs) == 2 * per_file
    want = [f * N + cut + j * (T + 1) for f in range(2) for j in range(per_file)]
    np.testing.assert_array_equal(inputs[:, 0], want)  # in file order, from offset 0
    np.testing.assert_array_equal(inputs, inputs[:, :1] + np.arange(T))
    assert [len(x[0]) for x in batches] == [5] * 5 + [1]  # last partial batch kept
    assert all(np.all(x[2] == 1.0) for x in batches)


def test_split_all_reads_whole_files(tmp_path):
    pattern, tok, _ = _positions_corpus(tmp_path)
    batches = _take(make_eval_dataset(_cfg(pattern), tok, 1000, split="all"), 10)
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0][0][:, 0], np.arange(N // (T + 1)) * (T + 1))


def test_bundled_corpus_val_split_matches_python_split():
    (text,) = read_texts([default_corpus_path()])
    tok = train_tokenizer("char", texts=[text])
    _, val = split_text(text, 0.1)
    ds = make_eval_dataset(DataConfig(seq_len=64), tok, 512)
    inputs = np.concatenate([x[0].numpy() for x in ds])
    assert inputs.shape == (111_540 // 65, 64)
    assert tok.decode(inputs[0]) == val[:64]
    assert tok.decode(inputs[-1]) == val[(len(inputs) - 1) * 65 :][:64]


def test_too_short_split_names_files_and_numbers(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 3, encoding="utf-8")
    tok = train_tokenizer("char", texts=["abcdefghij"])
    with pytest.raises(DataError) as exc:
        make_eval_dataset(DataConfig(files=(str(path),), seq_len=8), tok, 2)
    message = str(exc.value)
    assert str(path) in message and "has 3 tokens" in message and "9 tokens" in message
    with pytest.raises(DataError, match="train split is too short for one block of 65"):
        make_train_dataset(DataConfig(files=(str(path),)), tok, 2)


def test_eval_file_with_unknown_char_names_char_and_file(tmp_path):
    _, tok, _ = _positions_corpus(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("\u4e00\u4e01x\u4e02" * 10, encoding="utf-8")
    with pytest.raises(TokenizerError) as exc:
        make_eval_dataset(_cfg(str(other)), tok, 2, split="all")
    assert str(exc.value) == (
        f"data file '{other}': character 'x' at position 2 is not in the char "
        "tokenizer's vocabulary"
    )


def test_bpe_pipeline_blocks_are_contiguous_token_runs(tmp_path):
    (text,) = read_texts([default_corpus_path()])
    text = text[:30_000]
    path = tmp_path / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    tok = train_tokenizer("bpe", texts=[text], vocab_size=300)
    cfg = DataConfig(files=(str(path),), seq_len=16, val_fraction=0.1)
    train, val = split_text(text, 0.1)
    for inputs, targets, _ in _take(make_train_dataset(cfg, tok, 3), 2):
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
        assert all(tok.decode(row) in train for row in inputs)
    (inputs, targets, _), *_ = _take(make_eval_dataset(cfg, tok, 3), 1)
    np.testing.assert_array_equal(inputs[0], tok.encode(val)[:16])
