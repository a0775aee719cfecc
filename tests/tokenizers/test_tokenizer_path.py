"""`data.tokenizer` as a path: `tokenizer train`'s output is what `train` then uses."""

import pytest

from deepseek_tf.api import load, train
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.rundir import RunDir


def _config(tokenizer):
    return apply_overrides(load_config("tiny"), [
        f"data.tokenizer={tokenizer}", "train.steps=2", "train.eval_every=0",
    ])  # fmt: skip


@pytest.mark.parametrize(("kind", "name"), [("bpe", "tokenizer.json"), ("char", "")])
def test_a_trained_tokenizer_file_or_directory_is_what_train_uses(tmp_path, kind, name):
    out = tmp_path / "tok"
    assert (
        main(["tokenizer", "train", "--kind", kind, "--vocab-size", "300", "--out", str(out)]) == 0
    )
    run = tmp_path / "run"
    train(_config(str(out / name) if name else str(out)), out=run, verbose=0, sample_tokens=0)
    _, tokenizer = load(run)
    assert RunDir(run).read_config().model.vocab_size == tokenizer.vocab_size
    assert tokenizer.vocab_size == (300 if kind == "bpe" else 65)
    assert tokenizer.kind == kind


def test_a_missing_tokenizer_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer: .*nope.* neither char, bpe"):
        train(
            _config(str(tmp_path / "nope.json")), out=tmp_path / "run", verbose=0, sample_tokens=0
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.tokenizer: .*holds no tokenizer.json"):
        train(_config(str(tmp_path / "empty")), out=tmp_path / "run2", verbose=0, sample_tokens=0)
    assert not (tmp_path / "run").exists()
