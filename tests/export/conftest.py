"""Fixtures of the export tests: one tiny trained run shared by every test here."""

import pytest


@pytest.fixture(scope="package")
def export_run(tmp_path_factory):
    """A tiny run trained for 4 steps (about 6 s on 2 cores)."""
    from deepseek_tf.api import train
    from deepseek_tf.config.loader import load_config

    run_dir = tmp_path_factory.mktemp("export") / "tiny"
    config = load_config("tiny", overrides=["train.steps=4", "train.eval_every=0"])
    train(config, run_dir, verbose=0)
    return run_dir


@pytest.fixture(scope="package")
def loaded(export_run):
    """`(model, tokenizer)` of the shared run."""
    from deepseek_tf.api import load

    return load(export_run)
