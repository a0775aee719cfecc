"""Tool calling: DeepSeek's tool-call tokens parsed into OpenAI `tool_calls` (whole and
streamed), `tools`/`tool_choice` validated, tool turns rendered, and end to end through the
official `openai` client with a model scripted to write a call."""

import json
import sys
from pathlib import Path

import pytest
from scripted import scripted_model
from serving_helpers import request, start_server

from deepseek_tf.config.loader import update_config
from deepseek_tf.serving.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolCallStream,
    ToolError,
    parse_tool_calls,
    tool_set,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
from deepseek_style import write_deepseek_tokenizer  # noqa: E402

openai = pytest.importorskip("openai")


def v3_call(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


def v31_call(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{arguments}{CALL_END}"


def calls(*bodies: str) -> str:
    return CALLS_BEGIN + "".join(bodies) + CALLS_END


# (reply text, expected content, expected [(name, arguments)])
CASES = [
    ("It is sunny in Bern.", "It is sunny in Bern.", []),
    (
        calls(v3_call("get_weather", '{"city": "Bern"}')),
        None,
        [("get_weather", '{"city": "Bern"}')],
    ),
    (
        "Checking both." + calls(v3_call("a", "{}"), v3_call("b.c-d", '{"x": [1, {"y": null}]}')),
        "Checking both.",
        [("a", "{}"), ("b.c-d", '{"x": [1, {"y": null}]}')],
    ),
    (
        calls(v31_call("get_time", '{"tz":"Europe/Zurich"}')),
        None,
        [("get_time", '{"tz": "Europe/Zurich"}')],
    ),
    (calls(v3_call("say", '{"text": "Grüezi ```"}')), None, [("say", '{"text": "Grüezi ```"}')]),
    (calls(v3_call("f", "{not json")), None, [("f", "{not json")]),  # passed on as written
    (
        calls(v3_call("f", "{}"), CALL_BEGIN + "function" + SEP + "g\n```json\n{"),
        None,
        [("f", "{}")],
    ),
    ("Let me see" + CALLS_BEGIN + CALL_BEGIN + "function", None, []),  # no complete call
    ("a <｜tool", "a <｜tool", []),  # a marker's beginning that never completes
]


@pytest.mark.parametrize("text, content, expected", CASES)
def test_parser_reads_deepseek_tool_calls(text, content, expected):
    got_content, got = parse_tool_calls(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == expected
    assert got_content == (content if expected else text)
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)


@pytest.mark.parametrize("text, content, expected", CASES)
@pytest.mark.parametrize("size", [1, 3, 8])
def test_stream_gives_what_the_whole_reply_gives(text, content, expected, size):
    stream, streamed, items = ToolCallStream(), "", []
    for i in range(0, len(text), size):
        piece, new = stream.feed(text[i : i + size])
        assert CALLS_BEGIN not in piece
        streamed, items = streamed + piece, items + new
    streamed += stream.close()
    whole_content, whole = parse_tool_calls(text)
    assert (streamed or None) == whole_content
    assert [i["index"] for i in items] == list(range(len(whole)))
    assert [i["function"] for i in items] == [c["function"] for c in whole]


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize(
    "tools, choice, param, message",
    [
        ([], None, "tools", "non-empty list"),
        ([{"type": "code"}], None, "tools", "type 'function'"),
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools", "letters, digits"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": []}}],
            None,
            "tools",
            "JSON Schema",
        ),
        ([TOOL, TOOL], None, "tools", "unique"),
        ([TOOL], "always", "tool_choice", "one of"),
        (
            [TOOL],
            {"type": "function", "function": {"name": "other"}},
            "tool_choice",
            "name a function",
        ),
        (None, "required", "tool_choice", "needs 'tools'"),
    ],
)
def test_malformed_tools_name_the_field(tools, choice, param, message):
    with pytest.raises(ToolError, match=message) as e:
        tool_set(tools, choice)
    assert e.value.param == param


def test_tool_choice_forms():
    assert tool_set([TOOL], None).choice == "auto"
    assert tool_set(None, None) is None
    named = tool_set([TOOL], {"type": "function", "function": {"name": "get_weather"}})
    assert named.choice == "get_weather" and named.forced
    assert not tool_set([TOOL], "none").parses


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, tiny_config):
    """A server whose model answers any chat with one call of get_weather (V3.1 form;
    arguments `{}`: the scripted model writes each token at most once)."""
    from deepseek_tf.tokenizers import load_tokenizer

    tok = load_tokenizer(write_deepseek_tokenizer(tmp_path_factory.mktemp("tool_tok")))
    reply = "Sure." + calls(v31_call("get_weather", "{}"))
    chain = [tok.hf_tokenizer.token_to_id("<｜Assistant｜>"), *tok.encode(reply), tok.eos_id]
    config = update_config(tiny_config, model={"max_seq_len": 128})  # room for a tool turn
    model = scripted_model(config, tok.vocab_size, chain)
    srv, app, url = start_server(model, tok, max_tokens=32)
    yield url, tok
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_openai_client_gets_tool_calls(tool_server):
    url, _ = tool_server
    messages = [{"role": "user", "content": "Weather in Bern?"}]
    out = _client(url).chat.completions.create(
        model="tiny", messages=messages, tools=[TOOL], temperature=0, max_tokens=30
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {}
    # without tools (or with tool_choice none) the same tokens come back as text
    plain = _client(url).chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=30
    )
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content.startswith("Sure." + CALLS_BEGIN)
    assert plain.choices[0].finish_reason == "stop"


def test_openai_client_streams_tool_calls(tool_server):
    url, _ = tool_server
    stream = _client(url).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[TOOL],
        temperature=0,
        max_tokens=30,
        stream=True,
    )
    content, calls_seen, reasons = "", [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls_seen += delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert content == "Sure."
    assert [(c.index, c.function.name) for c in calls_seen] == [(0, "get_weather")]
    assert json.loads(calls_seen[0].function.arguments) == {}
    assert reasons[-1] == "tool_calls"


def test_tool_turns_are_rendered_and_bad_tools_are_400(tool_server):
    url, tok = tool_server
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = {"model": "tiny", "messages": history, "tools": [TOOL], "max_tokens": 1}
    status, reply = request(url, "POST", "/v1/chat/completions", body)
    assert status == 200, reply
    rendered = tok.apply_chat_template(
        [{**m, "content": m["content"] or ""} for m in history], tools=[TOOL]
    )
    assert "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>" in rendered
    assert 'get_weather\n```json\n{"city": "Bern"}\n```' in rendered
    assert reply["usage"]["prompt_tokens"] == len(tok.encode(rendered))
    for bad_body, param in [
        ({**body, "tools": [{"type": "function"}]}, "tools"),
        ({**body, "tool_choice": "sometimes"}, "tool_choice"),
        ({**body, "messages": [{"role": "assistant", "tool_calls": [{}]}]}, "messages"),
    ]:
        status, error = request(url, "POST", "/v1/chat/completions", bad_body)
        assert status == 400 and error["error"]["param"] == param, error
