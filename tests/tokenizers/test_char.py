"""Character tokenizer: vocabulary, errors, graph encoding, save/load and the CLI."""

from __future__ import annotations

import argparse
import json
import pathlib

import pytest
import tensorflow as tf

from deepseek_tf.cli import tokenizer_cmd
from deepseek_tf.data.corpus import default_corpus_path, read_texts
from deepseek_tf.errors import DataError, RunDirError, TokenizerError
from deepseek_tf.tokenizers import CharTokenizer, load_tokenizer, train_tokenizer

TEXT = "To be, or not to be: that is the question.\nCaf\u00e9 \u00fcber \U0001f600!\n"


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return train_tokenizer("char", texts=[TEXT])


def test_bundled_corpus_has_65_characters():
    tok = train_tokenizer("char", files=[default_corpus_path()])
    assert tok.kind == "char"
    assert tok.vocab_size == 65
    assert tok.eos_id is None
    assert tok.chars[:3] == ("\n", " ", "!")


def test_vocabulary_is_sorted_and_round_trips(tok):
    assert list(tok.chars) == sorted(set(TEXT))
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch(["To", "be"]) == [tok.encode("To"), tok.encode("be")]


def test_unknown_character_names_char_and_position(tok):
    with pytest.raises(TokenizerError) as exc:
        tok.encode("To beZ")
    assert str(exc.value) == (
        "character 'Z' at position 5 is not in the char tokenizer's vocabulary"
    )


def test_decode_out_of_range_names_id_and_vocab_size(tok):
    size = tok.vocab_size
    with pytest.raises(TokenizerError, match=f"token id {size} .*vocabulary size {size}"):
        tok.decode([0, size])
    with pytest.raises(TokenizerError, match="token id -1 "):
        tok.decode([-1])


def test_tf_encode_matches_encode_inside_dataset_map(tok):
    assert tok.tf_encode(tf.constant(TEXT)).numpy().tolist() == tok.encode(TEXT)
    ds = tf.data.Dataset.from_tensor_slices([TEXT, "be"]).map(tok.tf_encode)
    got = [ids.numpy().tolist() for ids in ds]
    assert got == [tok.encode(TEXT), tok.encode("be")]
    assert ds.element_spec.dtype == tf.int32


def test_tf_encode_rejects_unknown_characters(tok):
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the char tokenizer"):
        tok.tf_encode(tf.constant("Z"))


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "run")
    assert path == str(tmp_path / "run" / "char_tokenizer.json")
    payload = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    assert payload == {"kind": "char", "chars": list(tok.chars)}
    loaded = load_tokenizer(tmp_path / "run")
    assert isinstance(loaded, CharTokenizer)
    assert loaded.chars == tok.chars
    assert loaded.encode(TEXT) == tok.encode(TEXT)


def test_load_without_tokenizer_names_directory(tmp_path):
    with pytest.raises(RunDirError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_malformed_char_file_names_file(tmp_path):
    path = tmp_path / "char_tokenizer.json"
    path.write_text('{"kind": "char", "chars": ["a", "bc"]}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="char_tokenizer.json.*'bc' is not one character"):
        load_tokenizer(tmp_path)


def test_train_tokenizer_rejects_unknown_kind():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'word'"):
        train_tokenizer("word", texts=["abc"])


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-tf")
    tokenizer_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_trains_char_tokenizer_on_globs(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("xyz\n", encoding="utf-8")
    out = tmp_path / "tok"
    rc = _cli(["tokenizer", "train", "--files", str(tmp_path / "*.txt"), "--out", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "vocab_size=7" in lines[0]
    assert str(out / "char_tokenizer.json") in lines[0]
    assert load_tokenizer(out).decode(range(7)) == "\nabcxyz"


def test_cli_default_files_is_bundled_corpus(tmp_path, capsys):
    assert _cli(["tokenizer", "train", "--kind", "char", "--out", str(tmp_path)]) == 0
    assert "vocab_size=65" in capsys.readouterr().out
    (text,) = read_texts([default_corpus_path()])
    assert (
        load_tokenizer(tmp_path).decode(load_tokenizer(tmp_path).encode(text[:500])) == text[:500]
    )


def test_encode_array_equals_encode_and_names_unknown_characters():
    import numpy as np
    import pytest

    from deepseek_tf.errors import TokenizerError
    from deepseek_tf.tokenizers.char import CharTokenizer

    tok = CharTokenizer.train(["héllo wörld ✓\n"])
    text = "wörld ✓ héllo\n" * 3
    assert np.array_equal(tok.encode_array(text), tok.encode(text))
    with pytest.raises(TokenizerError, match="'x' at position 2"):
        tok.encode_array("hox")


def test_texts_and_files_are_separate_keywords(tmp_path):
    """A str is a text, never a file name; files go in `files=` (one path or several)."""
    (tmp_path / "x.txt").write_text("xyz", encoding="utf-8")
    name = str(tmp_path / "x.txt")
    assert set(train_tokenizer("char", texts=[name]).chars) == set(name)  # the name's chars
    assert train_tokenizer("char", files=[name]).chars == ("x", "y", "z")
    assert train_tokenizer("char", files=tmp_path / "x.txt").chars == ("x", "y", "z")
    both = train_tokenizer("char", texts=(t for t in ["ab"]), files=[name])  # a generator too
    assert both.chars == ("a", "b", "x", "y", "z")
    with pytest.raises(TypeError):
        train_tokenizer("char", [pathlib.Path(name)])  # texts and files are keywords only


def test_train_tokenizer_needs_some_text(tmp_path):
    with pytest.raises(DataError, match="no training text"):
        train_tokenizer("char")
    with pytest.raises(DataError, match="files= is empty"):
        train_tokenizer("char", files=[])  # not the bundled corpus in disguise
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer("char", files=[tmp_path / "missing.txt"])


def test_what_differs_between_kinds_is_asked_of_the_tokenizer(tok):
    assert tok.char_table == tok.chars and not tok.hugging_face_format
    assert tok.unknown_char("To#be") == (2, "#")
    assert tok.drop_unknown("To#be~") == "Tobe"
    assert tok.count_tokens(["To be", ""]) == [5, 0]


def test_save_into_an_existing_file_is_a_one_line_error(tok, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me", encoding="utf-8")
    with pytest.raises(RunDirError, match="taken is an existing file") as error:
        tok.save(target)
    assert "\n" not in str(error.value)
    assert target.read_text(encoding="utf-8") == "keep me"


def test_cli_out_naming_an_existing_file_is_one_line(tmp_path, capsys):
    from deepseek_tf.cli.main import main

    (tmp_path / "taken").write_text("keep me", encoding="utf-8")
    assert main(["tokenizer", "train", "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "existing file" in err and "\n" not in err
