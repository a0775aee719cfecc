"""`deepseek-tf data prepare` and `data.prepared`: sharded corpora streamed into training."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.api import load, train
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.data.pipeline import make_eval_dataset, make_train_dataset, next_batch
from deepseek_tf.data.prepare import prepare
from deepseek_tf.data.prepared import read_manifest
from deepseek_tf.errors import ConfigError, DataError, InputError
from deepseek_tf.tokenizers import load_tokenizer_path

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(3000))


def _shard_ids(directory, split):
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    ids = []
    for shard in manifest["splits"][split]["shards"]:
        for record in tf.data.TFRecordDataset(str(directory / shard["file"])):
            ids.append(np.frombuffer(record.numpy(), dtype=dtype))
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_shards_hold_exactly_the_tokenized_text(corpus, tmp_path):
    out = tmp_path / "prep"
    manifest = prepare([str(corpus)], "char", out, val_fraction=0.0, record_tokens=1000,
                       shard_tokens=50_000, log=None)  # fmt: skip
    tokenizer = load_tokenizer_path(out)
    assert np.array_equal(_shard_ids(out, "train"), tokenizer.encode(TEXT))
    train_split = manifest["splits"]["train"]
    assert train_split["tokens"] == len(TEXT) and len(train_split["shards"]) == 4
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == tokenizer.vocab_size


def test_jsonl_and_parquet_records_with_a_validation_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [f"document {i} " * 20 for i in range(400)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:200]))
    pq.write_table(pa.table({"text": docs[200:]}), tmp_path / "b.parquet")
    out = tmp_path / "prep"
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]
    manifest = prepare(files, "char", out, val_fraction=0.2, record_tokens=512, log=None)
    splits = manifest["splits"]
    assert splits["train"]["records"] + splits["val"]["records"] == 400
    assert 40 <= splits["val"]["records"] <= 120  # ~20% by hash
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == sum(map(len, docs))


def test_bad_records_fail_with_their_line_or_are_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "fine"}\n{"text": \n{"title": "no text"}\n\xff\xfe\n{"text": "ok"}\n'
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        prepare([str(path)], "char", tmp_path / "a", log=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.partial").exists()
    manifest = prepare([str(path)], "char", tmp_path / "b", on_bad_record="skip",
                       val_fraction=0.0, log=None)  # fmt: skip
    assert manifest["skipped"] == {"malformed JSON": 1, "no 'text' field": 1, "not UTF-8": 1}
    assert manifest["splits"]["train"]["records"] == 2
    missing = tmp_path / "nofield.jsonl"
    missing.write_text('{"text": "a"}\n{"text": "b"}\n{"title": "c"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:3: no 'text' field"):
        prepare([str(missing)], "char", tmp_path / "d", log=None)


def test_non_utf8_text_empty_input_and_an_existing_out_are_one_line_errors(tmp_path, corpus):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 at byte 3"):
        prepare([str(bad)], "char", tmp_path / "a", log=None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"title": "x"}\n')
    with pytest.raises(DataError, match="no training text"):
        prepare([str(empty)], "char", tmp_path / "b", on_bad_record="skip", log=None)
    prepare([str(corpus)], "char", tmp_path / "c", log=None)
    with pytest.raises(InputError, match="already exists"):
        prepare([str(corpus)], "char", tmp_path / "c", log=None)


def test_manifest_problems_are_named(tmp_path, corpus):
    with pytest.raises(DataError, match="has no manifest.json"):
        read_manifest(tmp_path)
    out = tmp_path / "prep"
    prepare([str(corpus)], "char", out, log=None)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"] = []
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="lists no training shards"):
        read_manifest(out)
    with pytest.raises(ConfigError, match="data.prepared"):
        apply_overrides(load_config("tiny"), [f"data.prepared={out}", f"data.files=[{corpus}]"])


def _config(prepared, *extra):
    return apply_overrides(load_config("tiny"), [f"data.prepared={prepared}", *extra])


def test_the_stream_resumes_at_exactly_the_same_batch(corpus, tmp_path):
    out = tmp_path / "prep"
    prepare([str(corpus)], "char", out, record_tokens=2000, shard_tokens=20_000, log=None)
    config = _config(out)
    tokenizer = load_tokenizer_path(out)
    full = [b[0].numpy() for b in make_train_dataset(config.data, tokenizer, 4).take(12)]
    later = [b[0].numpy() for b in make_train_dataset(config.data, tokenizer, 4, start_batch=7)
             .take(5)]  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(full[7:], later, strict=True))
    assert not np.array_equal(full[0], full[1])
    halves = [make_train_dataset(config.data, tokenizer, 4, num_shards=2, shard_index=k)
              for k in range(2)]  # fmt: skip
    first = [next(iter(h))[0].numpy() for h in halves]
    assert not np.array_equal(first[0], first[1])  # the workers read different files


def test_train_on_a_prepared_directory_and_evaluate_its_validation_shards(corpus, tmp_path):
    out = tmp_path / "prep"
    argv = ["data", "prepare", "--files", str(corpus), "--tokenizer", "char", "--out", str(out)]
    assert main([*argv, "--record-tokens", "4096", "--val-fraction", "0.3"]) == 0
    run = tmp_path / "run"
    config = _config(out, "train.steps=4", "train.eval_every=4", "train.log_every=2")
    summary = train(config, out=run, verbose=0, sample_tokens=0)
    assert summary["step"] == 4
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["val_loss"] for e in lines if "val_loss" in e]
    _, tokenizer = load(run)
    assert tokenizer.vocab_size == load_tokenizer_path(out).vocab_size
    val = make_eval_dataset(config.data, tokenizer, 8)
    tokens = sum(int(b[2].numpy().sum()) for b in val)
    assert tokens > 0 and tokens <= read_manifest(out)["splits"]["val"]["tokens"]
    # the run's tokenizer prepares a new corpus (--tokenizer RUN)
    again = prepare([str(corpus)], str(run), tmp_path / "again", log=None)
    assert again["vocab_size"] == tokenizer.vocab_size


def test_a_corrupt_shard_is_a_one_line_error(corpus, tmp_path):
    out = tmp_path / "prep"
    prepare([str(corpus)], "char", out, log=None)
    shard = out / read_manifest(out)["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[20:40] = b"\x00" * 20  # inside the first record: its CRC no longer matches
    shard.write_bytes(bytes(raw))
    config = _config(out)
    iterator = iter(make_train_dataset(config.data, load_tokenizer_path(out), 2))
    with pytest.raises(DataError, match="could not be read"):
        for _ in range(50):
            next_batch(iterator)
