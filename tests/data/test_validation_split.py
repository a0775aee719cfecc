"""`data prepare` never leaves the validation split silently empty, and `check_prepared`
says so before training starts (issue 23: a 213 KB file gave 0 validation tokens and the
run failed only at its final evaluation)."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.loader import load_config, update_config
from deepseek_tf.data.pipeline import check_validation_data, make_eval_dataset
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.prepared import check_prepared, read_manifest
from deepseek_tf.data.sources import is_validation, iter_records
from deepseek_tf.errors import DataError
from deepseek_tf.tokenizers import load_tokenizer_path

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(3000))


def _shard_ids(directory, split):
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    ids = [np.frombuffer(r.numpy(), dtype=dtype)
           for shard in manifest["splits"][split]["shards"]
           for r in tf.data.TFRecordDataset(str(directory / shard["file"]))]  # fmt: skip
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def _config(prepared):
    return update_config(load_config("tiny"), data={"prepared": str(prepared)})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _small_corpus(tmp_path):
    """~213 KB of text in `text.txt`: 13 records of ~16 KiB, none of which the hash sends to
    validation under this file name (so the split depends on `prepare`'s fallback)."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(3900))
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    records = list(iter_records([path]))
    assert 200_000 < len(text) < 220_000 and len(records) >= 13
    assert not any(is_validation(r, 0.1) for r in records)  # what the hash alone gives
    return path, text, len(records)


def test_a_213_kb_file_gets_a_validation_split_with_the_default_fraction(tmp_path):
    path, text, n_records = _small_corpus(tmp_path)
    out = tmp_path / "prep"
    manifest = prepare([str(path)], "char", out, log=None)  # the default --val-fraction 0.1
    splits = manifest["splits"]
    assert splits["val"]["tokens"] > 1000 and splits["val"]["records"] == 1
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == len(text)
    assert splits["train"]["records"] + splits["val"]["records"] == n_records
    # every token of the file is in exactly one split (the held record moved, not copied)
    tokens = np.concatenate([_shard_ids(out, "train"), _shard_ids(out, "val")])
    assert np.array_equal(np.sort(tokens), np.sort(load_tokenizer_path(out).encode(text)))
    assert check_prepared(out, need_val=True, seq_len=256) == read_manifest(out)
    val = make_eval_dataset(_config(out).data, load_tokenizer_path(out), 8)  # what train evaluates
    assert sum(int(b[2].numpy().sum()) for b in val) > 0


def test_a_one_record_corpus_splits_its_tail_and_a_too_small_one_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be\n" * 100, encoding="utf-8")  # 1,900 chars: one record
    manifest = prepare([str(path)], "char", tmp_path / "a", val_fraction=0.2, log=None)
    assert manifest["splits"]["val"]["tokens"] == 380
    assert manifest["splits"]["train"]["tokens"] == 1520
    tail = load_tokenizer_path(tmp_path / "a").encode("to be or not to be\n" * 20)
    assert np.array_equal(_shard_ids(tmp_path / "a", "val"), tail)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a", encoding="utf-8")
    with pytest.raises(DataError, match="too few to split .*--val-fraction 0"):
        prepare([str(tiny)], "char", tmp_path / "b", log=None)
    assert not (tmp_path / "b").exists()
    assert prepare([str(tiny)], "char", tmp_path / "c", val_fraction=0.0, log=None)


def test_check_prepared_refuses_an_empty_or_too_short_validation_split(tmp_path, corpus):
    out = tmp_path / "noval"
    prepare([str(corpus)], "char", out, val_fraction=0.0, log=None)
    assert check_prepared(out, need_val=False)["splits"]["val"]["tokens"] == 0
    with pytest.raises(DataError) as error:
        check_prepared(out, need_val=True)
    message = str(error.value)
    assert "no validation tokens (prepared with --val-fraction 0)" in message
    assert "train.eval_every=0" in message and "\n" not in message
    with pytest.raises(DataError, match="no validation tokens"):  # not "--val-fraction 0?"
        make_eval_dataset(_config(out).data, load_tokenizer_path(out), 4)
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n" * 30, encoding="utf-8")  # val: the last 57 tokens
    prepare([str(short)], "char", tmp_path / "shortval", log=None)
    assert check_prepared(tmp_path / "shortval", need_val=True, seq_len=16)
    with pytest.raises(DataError, match=r"57 tokens, fewer than one sequence of 65"):
        check_prepared(tmp_path / "shortval", need_val=True, seq_len=64)


def test_check_validation_data_reads_a_prepared_manifest_or_the_files(tmp_path):
    path, _, _ = _small_corpus(tmp_path)
    prepare([str(path)], "char", tmp_path / "prep", log=None)
    tokenizer = load_tokenizer_path(tmp_path / "prep")
    check_validation_data(_config(tmp_path / "prep").data, tokenizer)
    prepare([str(path)], "char", tmp_path / "noval", val_fraction=0.0, log=None)
    with pytest.raises(DataError, match="no validation tokens"):
        check_validation_data(_config(tmp_path / "noval").data, tokenizer)
    files = update_config(load_config("tiny"), data={"files": [str(path)], "val_fraction": 5e-5})
    with pytest.raises(DataError, match="val split is too short .*train.eval_every=0"):
        check_validation_data(files.data, tokenizer)
    check_validation_data(update_config(files, data={"val_fraction": 0.1}).data, tokenizer)


def test_records_all_hashed_to_validation_leave_one_for_training(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = ["to be or not to be", "that is the question, whether tis nobler", "in the mind"]
    path.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs), encoding="utf-8")
    assert all(is_validation(r, 0.9) for r in iter_records([path]))  # the hash: all val
    manifest = prepare([str(path)], "char", tmp_path / "p", val_fraction=0.9, log=None)
    splits = manifest["splits"]
    assert (splits["train"]["records"], splits["val"]["records"]) == (1, 2)
    eos = load_tokenizer_path(tmp_path / "p").eos_id is not None
    assert splits["train"]["tokens"] == len(docs[1]) + eos  # the longest record
