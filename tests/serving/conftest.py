"""A tiny trained run served on 127.0.0.1 (a free port) from a background thread."""

import pytest
from serving_helpers import start_server


@pytest.fixture(scope="session")
def serve_run(trained_run):
    return trained_run


@pytest.fixture(scope="session")
def server(loaded):
    model, tokenizer = loaded
    srv, app, url = start_server(model, tokenizer, max_tokens=32)
    yield srv, app, url
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()
