"""`response_format: {"type": "json_object"}` end to end: a real (untrained) tiny model with a
byte-level BPE tokenizer, greedy under the JSON mask, served on 127.0.0.1."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from serving_helpers import request, start_server

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
from deepseek_style import write_deepseek_tokenizer  # noqa: E402

from deepseek_tf.serving.json_constraint import INITIAL, closing, is_object_prefix, walk  # noqa: E402

MESSAGES = [{"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def json_server(tmp_path_factory, tiny_config):
    from deepseek_tf.api import load
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.rundir import RunDir
    from deepseek_tf.tokenizers import load_tokenizer

    root = tmp_path_factory.mktemp("json_mode")
    tokenizer = load_tokenizer(write_deepseek_tokenizer(root / "tok"))
    model_config = dataclasses.replace(tiny_config.model, vocab_size=tokenizer.vocab_size)
    config = dataclasses.replace(tiny_config, model=model_config)
    RunDir(root / "run").write_weights_run(config, tokenizer, build_model(config))
    srv, app, url = start_server(*load(root / "run"), max_tokens=32)
    yield app, url
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()


def _chat(url, **extra):
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 30, **extra}
    status, answer = request(url, "POST", "/v1/chat/completions", body)
    assert status == 200, answer
    return answer["choices"][0]


def test_greedy_output_under_the_mask_is_a_json_object(json_server):
    _, url = json_server
    free = _chat(url)["message"]["content"]
    assert not is_object_prefix(free)  # the untrained model writes no JSON by itself
    choice = _chat(url, response_format={"type": "json_object"})
    text = choice["message"]["content"]
    assert text.strip() and is_object_prefix(text), text
    if choice["finish_reason"] == "stop":  # EOS came only once the object was closed
        assert isinstance(json.loads(text), dict)
    else:  # the token limit cut it: what is there still completes to an object
        assert isinstance(json.loads(text + closing(walk(INITIAL, text))), dict)
    assert _chat(url, response_format={"type": "text"})["message"]["content"] == free


def test_json_mode_streams_the_same_text(json_server):
    _, url = json_server
    whole = _chat(url, response_format={"type": "json_object"})["message"]["content"]
    port = int(url.rsplit(":", 1)[1])
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 30, "stream": True}
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**body, "response_format": {"type": "json_object"}}),
    )
    raw = conn.getresponse().read().decode()
    conn.close()
    chunks = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole
