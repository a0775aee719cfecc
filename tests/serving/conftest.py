"""A tiny trained run served on 127.0.0.1 (a free port) from a background thread."""

import pytest
from serving_helpers import start_server


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory):
    from deepseek_tf.api import train
    from deepseek_tf.config.loader import load_config

    run_dir = tmp_path_factory.mktemp("serve") / "tiny-serve"
    config = load_config("tiny", overrides=["train.steps=4", "train.eval_every=0"])
    train(config, run_dir, verbose=0)
    return run_dir


@pytest.fixture(scope="session")
def loaded(serve_run):
    from deepseek_tf.api import load

    return load(serve_run)


@pytest.fixture(scope="session")
def server(loaded):
    model, tokenizer = loaded
    srv, app, url = start_server(model, tokenizer, max_tokens=32)
    yield srv, app, url
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()
