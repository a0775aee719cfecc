"""Byte-level BPE tokenizer: exact round trips, special token, graph encoding, save/load."""

from __future__ import annotations

import argparse

import pytest
import tensorflow as tf
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_tf.cli import tokenizer_cmd
from deepseek_tf.data.corpus import default_corpus_path, read_texts
from deepseek_tf.errors import ConfigError, TokenizerError
from deepseek_tf.tokenizers import (
    MAX_BPE_VOCAB,
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
    train_tokenizer,
)

VOCAB = 400


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    (text,) = read_texts([default_corpus_path()])
    return train_tokenizer("bpe", texts=[text[:20_000]], vocab_size=VOCAB)


def test_trained_vocabulary(tok):
    assert tok.kind == "bpe"
    assert 257 < tok.vocab_size <= VOCAB
    assert tok.eos_id == tok.hf_tokenizer.token_to_id("<|endoftext|>")
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    # merges were learned: common English compresses below one token per character
    text = "the king and the queen"
    assert len(tok.encode(text)) < len(text)


@settings(max_examples=60, deadline=None, database=None)
@given(st.text(max_size=120))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        " leading space",
        "tabs\tand\r\nCRLF",
        "\x00nul",
        "\u4e2d\u6587 \U0001f600",
        "a<|endoftext|>b",
    ],
)
def test_round_trip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_out_of_range_names_id(tok):
    with pytest.raises(TokenizerError, match=f"token id {tok.vocab_size} .*{tok.vocab_size}"):
        tok.decode([1, tok.vocab_size])


def test_vocab_size_below_byte_alphabet_is_rejected():
    with pytest.raises(ConfigError, match="bpe vocab_size 100 is below 257"):
        train_tokenizer("bpe", texts=["hello"], vocab_size=100)


def test_an_absurd_vocab_size_is_a_config_error_before_the_rust_library(monkeypatch):
    """2,000,000,000 made `tokenizers` abort the process (a Rust panic, exit 134)."""

    def trainer(**kwargs):
        raise AssertionError(f"BpeTrainer reached with vocab_size {kwargs['vocab_size']}")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", trainer)
    with pytest.raises(ConfigError, match="above the limit of 1,048,576") as error:
        train_tokenizer("bpe", texts=["hello"], vocab_size=2_000_000_000)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="2,000,000,000"):  # checked before reading files
        train_tokenizer("bpe", files=["no/such/file.txt"], vocab_size=2_000_000_000)
    assert MAX_BPE_VOCAB == 1_048_576


def test_a_vocabulary_that_stops_short_says_so_in_one_line(tok, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("hello world, hello tensorflow\n" * 50, encoding="utf-8")
    short = train_tokenizer("bpe", files=[small], vocab_size=4096)
    err = capsys.readouterr().err.strip()
    assert short.vocab_size < 4096
    assert err == (
        f"[tokenizer] warning: the bpe vocabulary reached only {short.vocab_size} of the "
        "4,096 tokens asked for (the text has no more pairs to merge; train on more text "
        "or ask for fewer)"
    )
    train_tokenizer("bpe", files=[small], vocab_size=4096, log=None)  # silenced
    assert tok.vocab_size == VOCAB  # reached: no warning (the fixture's)
    assert capsys.readouterr().err == ""


def test_what_differs_between_kinds_is_asked_of_the_tokenizer(tok):
    assert tok.hugging_face_format and tok.char_table is None
    assert tok.unknown_char("any \u00e9 text \U0001f600") is None  # bytes: anything encodes
    assert tok.drop_unknown("caf\u00e9") == "caf\u00e9"
    assert tok.count_tokens(["the king", ""]) == [len(tok.encode("the king")), 0]


def test_tf_encode_matches_encode(tok):
    text = "First Citizen:\nBefore we proceed, caf\u00e9."
    assert tok.tf_encode(tf.constant(text)).numpy().tolist() == tok.encode(text)
    ds = tf.data.Dataset.from_tensor_slices([text, "You are all resolved"]).map(tok.tf_encode)
    assert [x.numpy().tolist() for x in ds] == tok.encode_batch([text, "You are all resolved"])


def test_save_is_standard_hf_file_and_loads_back(tok, tmp_path):
    CharTokenizer(["a"]).save(tmp_path)  # replaced by the bpe save below
    path = tok.save(tmp_path)
    assert path == str(tmp_path / "tokenizer.json")
    assert not (tmp_path / "char_tokenizer.json").exists()
    hf = tokenizers.Tokenizer.from_file(path)
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    assert hf.encode(text).ids == tok.encode(text)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eos_id == tok.eos_id
    assert loaded.decode(loaded.encode(text)) == text


def test_corrupt_tokenizer_json_names_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot read tokenizer"):
        load_tokenizer(tmp_path)


def test_cli_trains_bpe(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("hello world, hello tensorflow\n" * 50, encoding="utf-8")
    parser = argparse.ArgumentParser(prog="deepseek-tf")
    tokenizer_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "tok"
    args = parser.parse_args(
        [
            "tokenizer",
            "train",
            "--files",
            str(src),
            "--kind",
            "bpe",
            "--vocab-size",
            "300",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    loaded = load_tokenizer(out)
    assert f"vocab_size={loaded.vocab_size}" in line
    assert str(out / "tokenizer.json") in line
    assert loaded.decode(loaded.encode("hello world")) == "hello world"
