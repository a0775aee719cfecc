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
from deepseek_tf.errors import TokenizerError
from deepseek_tf.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer, train_tokenizer

VOCAB = 400


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    (text,) = read_texts([default_corpus_path()])
    return train_tokenizer("bpe", [text[:20_000]], vocab_size=VOCAB)


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
    with pytest.raises(TokenizerError, match="bpe vocab_size 100"):
        train_tokenizer("bpe", ["hello"], vocab_size=100)


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
