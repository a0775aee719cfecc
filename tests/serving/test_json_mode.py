"""Structured output end to end: `response_format` `json_object` and `json_schema`, and
forced tool calls, on a real (untrained) tiny model with a byte-level BPE tokenizer,
greedy under the grammar's masks, served on 127.0.0.1. Every finished reply parses and
validates against its schema (`jsonschema`)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from serving_helpers import request, start_server

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
from deepseek_style import write_deepseek_tokenizer  # noqa: E402

jsonschema = pytest.importorskip("jsonschema")

MESSAGES = [{"role": "user", "content": "Weather?"}]
# bounded documents: enums, small integers, short arrays, nested objects, no free strings
SCHEMA = {
    "type": "object",
    "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "ok": {"type": "boolean"},
        "days": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 1,
            "maxItems": 2,
        },  # fmt: skip
        "where": {
            "type": "object",
            "properties": {
                "zone": {"enum": ["north", "south"]},
                "n": {"type": "integer", "maximum": 99, "minimum": 0},
            },
            "required": ["zone", "n"],
            "additionalProperties": False,
        },
    },
    "required": ["unit", "ok", "days", "where"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": SCHEMA},
}
OTHER = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
            "additionalProperties": False,
        },  # fmt: skip
    },
}


@pytest.fixture(scope="module")
def json_server(tmp_path_factory, tiny_config):
    import keras

    from deepseek_tf.api import load
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.rundir import RunDir
    from deepseek_tf.tokenizers import load_tokenizer

    root = tmp_path_factory.mktemp("json_mode")
    tokenizer = load_tokenizer(write_deepseek_tokenizer(root / "tok"))
    model_config = dataclasses.replace(
        tiny_config.model, vocab_size=tokenizer.vocab_size, max_seq_len=160
    )
    config = dataclasses.replace(tiny_config, model=model_config)
    keras.utils.set_random_seed(5)  # the same weights whatever ran before in this process
    RunDir(root / "run").write_weights_run(config, tokenizer, build_model(config))
    srv, app, url = start_server(*load(root / "run"), max_tokens=140)
    yield app, url
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()


def _chat(url, **extra):
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 140, **extra}
    status, answer = request(url, "POST", "/v1/chat/completions", body)
    assert status == 200, answer
    return answer["choices"][0]


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_json_object_mode(json_server):
    _, url = json_server
    free = _chat(url, max_tokens=30)["message"]["content"]
    assert not _parses(free)  # the untrained model writes no JSON by itself
    choice = _chat(url, max_tokens=30, response_format={"type": "json_object"})
    text = choice["message"]["content"]
    assert text.lstrip().startswith("{"), text
    if choice["finish_reason"] == "stop":  # EOS came only once the object was closed
        assert isinstance(json.loads(text), dict)
    assert _chat(url, max_tokens=30, response_format={"type": "text"})["message"]["content"] == free


def test_json_schema_reply_validates(json_server):
    _, url = json_server
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    choice = _chat(url, response_format=fmt)
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    sampled = _chat(url, response_format=fmt, temperature=1.0, seed=3)
    assert sampled["finish_reason"] == "stop", sampled
    jsonschema.validate(json.loads(sampled["message"]["content"]), SCHEMA)


def test_structured_output_streams_the_same_text(json_server):
    _, url = json_server
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    whole = _chat(url, response_format=fmt)["message"]["content"]
    port = int(url.rsplit(":", 1)[1])
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 140, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "response_format": fmt}))
    raw = conn.getresponse().read().decode()
    conn.close()
    chunks = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole


def test_named_tool_choice_holds_the_arguments_to_the_schema(json_server):
    _, url = json_server
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = _chat(url, tools=[TOOL, OTHER], tool_choice=named)
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)


def test_required_tool_choice_calls_listed_tools(json_server):
    """`required`: an array of calls, as many as the model writes (greedy, an untrained
    model may not stop: sampled with four seeds, every finished reply is checked)."""
    _, url = json_server
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (TOOL, OTHER)}
    finished = 0
    for seed in range(4):
        choice = _chat(url, tools=[TOOL, OTHER], tool_choice="required", temperature=1, seed=seed)
        if choice["finish_reason"] == "length":
            assert "tool_calls" not in choice["message"]  # cut off: no partial call
            continue
        finished += 1
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert calls and choice["message"]["content"] is None
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, schemas[call["function"]["name"]])
    assert finished


@pytest.mark.parametrize(
    "schema, word",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "strng"}, "strng"),
    ],
)
def test_unsupported_schemas_are_400_naming_them(json_server, schema, word):
    _, url = json_server
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = {"messages": MESSAGES, "max_tokens": 4, "response_format": fmt}
    status, answer = request(url, "POST", "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "response_format", answer
    assert word in answer["error"]["message"]
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    body = {"messages": MESSAGES, "max_tokens": 4, "tools": [bad_tool], "tool_choice": "required"}
    status, answer = request(url, "POST", "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "tools", answer


def test_response_format_and_forced_tool_together_are_400(json_server):
    _, url = json_server
    body = {
        "messages": MESSAGES,
        "tools": [TOOL],
        "tool_choice": "required",
        "response_format": {"type": "json_object"},
    }
    status, answer = request(url, "POST", "/v1/chat/completions", body)
    assert status == 400 and "not both" in answer["error"]["message"]


def test_dynamic_batcher_refuses_structured_output(json_server):
    app, _ = json_server
    srv, other, url = start_server(app.model, app.tokenizer, batching="dynamic", max_tokens=8)
    try:
        body = {"messages": MESSAGES, "response_format": {"type": "json_object"}}
        status, answer = request(url, "POST", "/v1/chat/completions", body)
    finally:
        srv.shutdown()
        srv.server_close()
        other.batcher.stop()
    assert status == 400 and "--batching continuous" in answer["error"]["message"], answer
