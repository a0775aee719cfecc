"""`--batch-size auto`: measured step memory picks the largest batch under a budget."""

import pytest

from deepseek_tf.config.loader import load_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.training.autobatch import MIB, find_batch_size, step_bytes

VOCAB = 65


@pytest.fixture(scope="module")
def config():
    return load_config("tiny", overrides=["data.seq_len=48", "model.d_model=64"])


def test_step_memory_grows_with_the_batch(config):
    assert step_bytes(config, VOCAB, 256) > step_bytes(config, VOCAB, 8)


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_auto_batch_fits_the_budget_and_grows_with_it(config):
    small = find_batch_size(config, VOCAB, 24 * MIB, log=None)
    large = find_batch_size(config, VOCAB, 96 * MIB, log=None)
    assert small["seq_len"] == 48
    assert small["confirmed_step_mib"] <= 24
    assert large["confirmed_step_mib"] <= 96
    assert large["batch_size"] > small["batch_size"] >= 2


def test_a_budget_below_one_sequence_is_a_clear_error(config):
    with pytest.raises(ConfigError, match="batch-size auto"):
        find_batch_size(config, VOCAB, 1024, log=None)


def test_cli_rejects_a_malformed_batch_size(tmp_path, capsys):
    from deepseek_tf.cli.main import main

    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--batch-size", "x"])
    assert code == 2
    assert "--batch-size" in capsys.readouterr().err
