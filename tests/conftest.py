"""Shared fixtures: quiet TensorFlow, tiny configs, a trained tiny run."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# transformers >= 5.25 loads every model with `use_kernels=True` unless told otherwise and
# then requires the `kernels` package (hub kernels, which cannot be fetched here anyway)
os.environ.setdefault("USE_HUB_KERNELS", "NO")
# no persistent XLA cache in ~/.cache from the commands tests run (tests/cli/test_xla_cache.py
# turns it on in a directory of its own)
os.environ.setdefault("DEEPSEEK_TF_XLA_CACHE", "off")
# the suite's own presets (`tiny`, `tiny-moe`: few-second models) are not shipped; the
# loader finds them here, in this process and in every command a test starts
os.environ["DEEPSEEK_TF_PRESETS"] = str(Path(__file__).parent / "presets")
# tests in other folders use the serving tests' helpers (a real server on 127.0.0.1)
sys.path.insert(0, str(Path(__file__).parent / "serving"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    from deepseek_tf.config.loader import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_config):
    """A tiny run trained for 20 steps on the bundled corpus (shared, read-only)."""
    from deepseek_tf.api import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config, out=run_dir, verbose=0, sample_tokens=0)
    return run_dir


@pytest.fixture(scope="session")
def loaded(trained_run):
    """`(model, tokenizer)` of the shared tiny run."""
    from deepseek_tf.api import load

    return load(trained_run)
