"""Shared fixtures: quiet TensorFlow, tiny configs, a trained tiny run."""

import hashlib
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
def shared_dir(tmp_path_factory):
    """`shared_dir(name, make)`: the directory `name` made once by `make(path)` for the whole
    test run, however many xdist workers it has (the workers share the parent of their
    temporary directories; a file lock lets one make it while the others wait). What it
    holds is read-only for tests: copy it (`shutil.copytree`) to change it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    root = root / "shared"
    root.mkdir(exist_ok=True)

    def get(name: str, make) -> Path:
        path = root / name
        with FileLock(str(path) + ".lock"):
            if not (root / f"{name}.done").exists():
                make(path)
                (root / f"{name}.done").touch()
        return path

    return get


@pytest.fixture(scope="session")
def shared_run(shared_dir):
    """`shared_run(preset, overrides=())`: a run of `preset` with `overrides` trained once
    for the whole test run (see `shared_dir`): read-only, copy it to change it."""
    from deepseek_tf.api import train
    from deepseek_tf.config.loader import load_config

    def get(preset: str, overrides=()) -> Path:
        name = "-".join([preset, *overrides])
        for char in "/=[],":  # TensorFlow reads checkpoint paths as glob patterns
            name = name.replace(char, "_")
        if len(name) > 120:  # file names end at 255 bytes
            name = f"{preset}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"
        config = load_config(preset, overrides=list(overrides))
        return shared_dir(name, lambda p: train(config, out=p, verbose=0, sample_tokens=0))

    return get


@pytest.fixture(scope="session")
def trained_run(shared_run):
    """A tiny run trained for 20 steps on the bundled corpus (shared, read-only)."""
    return shared_run("tiny")


@pytest.fixture(scope="session")
def loaded(trained_run):
    """`(model, tokenizer)` of the shared tiny run."""
    from deepseek_tf.api import load

    return load(trained_run)
