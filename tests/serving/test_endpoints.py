"""/metrics, /tokenize, /detokenize, /health while loading, usage and timings, JSON mode's
request field, cancelling on disconnect and on the time limit: a real server on 127.0.0.1."""

import json
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import request, start_server

KEY = {"Authorization": "Bearer sekret"}
MESSAGES = [{"role": "user", "content": "Hi there"}]


def stop(srv, app):
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()


@pytest.fixture(scope="module")
def keyed(loaded):
    srv, app, url = start_server(*loaded, api_key="sekret", max_tokens=32, warm_up=False)
    yield app, url
    stop(srv, app)


@pytest.fixture
def stalled(loaded):
    """A server whose scheduler is stopped: generations wait forever; the jobs it makes."""
    srv, app, url = start_server(*loaded, max_tokens=32, warm_up=False)
    app.batcher.stop()
    jobs, submit = [], app.submit

    def keep(req, events=None, index=0):
        jobs.append(submit(req, events, index))
        return jobs[-1]

    app.submit = keep
    yield app, url, jobs
    srv.shutdown()
    srv.server_close()


def requests_counted(url) -> dict:
    status, text = request(url, "GET", "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "deepseek_tf_requests_total":
                out[sample.labels["endpoint"], sample.labels["status"]] = sample.value
    return out


# -- metrics -------------------------------------------------------------------------------
def test_metrics_count_requests_by_route_template(server):
    url = server[2]
    before = requests_counted(url)
    assert request(url, "POST", "/v1/completions", {"prompt": "Th", "max_tokens": 2})[0] == 200
    assert request(url, "GET", "/v1/models/some-unique-name")[0] == 404
    assert request(url, "POST", "/v1/models/tiny:predict", {"instances": [[1, 2]]})[0] == 200
    assert request(url, "GET", "/no/such/path-xyz")[0] == 404
    assert request(url, "GET", "/v1/completions")[0] == 405
    after = requests_counted(url)
    for key in [
        ("/v1/completions", "200"),
        ("/v1/models/{name}", "404"),
        ("/v1/models/{name}:predict", "200"),
        ("other", "404"),
        ("/v1/completions", "405"),
    ]:
        assert after.get(key, 0) == before.get(key, 0) + 1, key
    _, text = request(url, "GET", "/metrics")
    assert "some-unique-name" not in text and "path-xyz" not in text
    assert "deepseek_tf_queue_depth" in text


def test_metrics_and_health_need_no_key_the_rest_does(keyed):
    app, url = keyed
    assert request(url, "GET", "/metrics")[0] == 200
    assert request(url, "GET", "/health")[0] == 200
    for path, body in [("/tokenize", {"prompt": "Th"}), ("/detokenize", {"tokens": [1]})]:
        status, answer = request(url, "POST", path, body)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert request(url, "POST", path, body, KEY)[0] == 200


def test_health_answers_503_while_loading(loaded):
    srv, app, url = start_server(*loaded, warm_up=False)
    try:
        loading = {"status": "loading", "model": "tiny"}
        app.health = lambda: loading
        assert request(url, "GET", "/health") == (503, loading)
        app.health = lambda: {**loading, "status": "ok"}
        assert request(url, "GET", "/health")[0] == 200
    finally:
        stop(srv, app)


# -- tokenize / detokenize -----------------------------------------------------------------
def test_tokenize_matches_what_generation_sees(server, loaded):
    url, (_, tok) = server[2], loaded
    status, body = request(url, "POST", "/tokenize", {"prompt": "ROMEO:"})
    assert status == 200
    assert body == {"tokens": tok.encode_prompt("ROMEO:"), "count": 6, "max_model_len": 48}
    status, body = request(url, "POST", "/tokenize", {"messages": MESSAGES})
    assert status == 200 and body["tokens"] == tok.encode_chat(MESSAGES)
    chat = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    status, answer = request(url, "POST", "/v1/chat/completions", chat)
    assert status == 200 and answer["usage"]["prompt_tokens"] == body["count"]
    bare = {"messages": MESSAGES, "add_generation_prompt": False, "return_token_strs": True}
    status, body = request(url, "POST", "/tokenize", bare)
    assert body["tokens"] == tok.encode(tok.apply_chat_template(MESSAGES, False))
    assert "".join(body["token_strs"]) == tok.apply_chat_template(MESSAGES, False)
    status, body = request(url, "POST", "/tokenize", {"prompt": "Th", "add_special_tokens": False})
    assert status == 200 and body["tokens"] == tok.encode("Th")


def test_detokenize_round_trips_and_names_a_bad_id(server, loaded):
    url, (_, tok) = server[2], loaded
    ids = tok.encode("First Citizen:")
    assert request(url, "POST", "/detokenize", {"tokens": ids}) == (
        200,
        {"prompt": "First Citizen:"},
    )
    assert request(url, "POST", "/detokenize", {"tokens": []}) == (200, {"prompt": ""})
    status, body = request(url, "POST", "/detokenize", {"tokens": [1, 70000]})
    assert status == 400 and "70000" in body["error"]["message"]
    assert body["error"]["param"] == "tokens"


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/tokenize", {}, 400),
        ("/tokenize", {"prompt": "Th", "messages": MESSAGES}, 400),
        ("/tokenize", {"prompt": 5}, 400),
        ("/tokenize", {"prompt": ["Th"]}, 400),
        ("/tokenize", {"prompt": "\u20ac"}, 400),  # not in the char vocabulary
        ("/tokenize", {"prompt": "Th", "add_special_tokens": "yes"}, 400),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("/tokenize", {"prompt": "Th", "model": "other"}, 404),
        ("/tokenize", [1], 400),
        ("/detokenize", {}, 400),
        ("/detokenize", {"tokens": [True]}, 400),
        ("/detokenize", {"tokens": [-1]}, 400),
        ("/detokenize", {"tokens": "12"}, 400),
        ("/detokenize", {"tokens": [1.5]}, 400),
        ("/detokenize", {"tokens": [10**300]}, 400),
    ],
)
def test_bad_tokenize_requests_get_json_4xx(server, path, body, status):
    got, answer = request(server[2], "POST", path, body)
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "code"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.sampled_from(["Th", ""]) | json_values,
        "messages": st.just(MESSAGES) | json_values,
        "tokens": st.lists(st.integers(-3, 80), max_size=5) | json_values,
        "add_special_tokens": json_values,
        "add_generation_prompt": json_values,
        "return_token_strs": json_values,
        "model": st.just("tiny") | json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/tokenize", "/detokenize"]), body=fields | json_values)
def test_fuzzed_tokenize_bodies_never_5xx(server, path, body):
    status, answer = request(server[2], "POST", path, body)
    assert status < 500, answer
    assert ("error" in answer) == (status >= 400)


# -- usage, timings, response_format ---------------------------------------------------------
TIMINGS = {
    "queue_ms",
    "ttft_ms",
    "total_ms",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "tokens_per_second",
}


def test_usage_and_timings(server):
    url = server[2]
    status, body = request(url, "POST", "/v1/completions", {"prompt": "Th", "max_tokens": 5})
    assert status == 200
    assert body["usage"]["prompt_tokens_details"] == {
        "cached_tokens": body["timings"]["cached_tokens"]
    }
    timings = body["timings"]
    assert set(timings) == TIMINGS and timings["completion_tokens"] == 5
    assert timings["prompt_tokens"] == body["usage"]["prompt_tokens"] == 2
    assert timings["total_ms"] > 0
    stream = {"messages": MESSAGES, "max_tokens": 4, "stream": True}
    port = int(url.rsplit(":", 1)[1])
    for options, with_usage in [({"include_usage": True}, True), ({}, False)]:
        payload = json.dumps({**stream, "stream_options": options}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            raw = sock.makefile("rb").read().decode()
        events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finish) == 1 and set(finish[0]["timings"]) == TIMINGS
        usage = [c for c in chunks if "usage" in c]
        assert len(usage) == int(with_usage)
        if with_usage:
            assert usage[0]["usage"]["completion_tokens"] == 4
            assert usage[0]["timings"]["completion_tokens"] == 4


def test_response_format_is_parsed():
    from deepseek_tf.serving.protocol import Limits, parse_generation

    limits = Limits(context=48, max_prompt_tokens=48, max_tokens=32)

    def parse(fmt):
        return parse_generation({"prompt": "Th", "response_format": fmt}, "completion", limits, "m")

    assert parse({"type": "json_object"}).schema == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    named = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    assert parse(named).schema == schema
    assert parse({"type": "text"}).schema is None
    assert parse(None).schema is None


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": {}}},  # no name
        {"type": "json_schema", "json_schema": {"name": "x", "schema": []}},
        {"type": "xml"},
        {},
        "json_object",
        ["json_object"],
        5,
    ],
)
def test_unknown_response_formats_are_400(server, fmt):
    body = {"messages": MESSAGES, "max_tokens": 2, "response_format": fmt}
    status, answer = request(server[2], "POST", "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "response_format"


def test_json_mode_needs_a_vocabulary_that_can_write_an_object(server):
    body = {"messages": MESSAGES, "response_format": {"type": "json_object"}}
    status, answer = request(server[2], "POST", "/v1/chat/completions", body)
    assert status == 400, answer  # Shakespeare's characters have no '{'
    assert "cannot begin such a reply" in answer["error"]["message"]


# -- cancelling --------------------------------------------------------------------------------
def _send_raw(url, body: dict) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _wait(condition, seconds=5.0):
    deadline = time.perf_counter() + seconds
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_job(stalled, stream):
    app, url, jobs = stalled
    before = requests_counted(url).get(("/v1/completions", "499"), 0)
    sock = _send_raw(url, {"prompt": "Th", "max_tokens": 20, "stream": stream})
    _wait(lambda: len(jobs) == 1)
    time.sleep(0.2)
    assert not jobs[0].cancelled  # still waiting for its first token
    sock.close()
    _wait(lambda: jobs[0].cancelled, 2.0)
    _wait(lambda: requests_counted(url).get(("/v1/completions", "499"), 0) == before + 1)


def test_the_time_limit_answers_408_and_cancels(stalled):
    app, url, jobs = stalled
    app.request_timeout = 0.3
    started = time.perf_counter()
    for stream in (False, True):
        body = {"prompt": "Th", "max_tokens": 5, "stream": stream}
        status, answer = request(url, "POST", "/v1/completions", body)
        assert status == 408 and answer["error"]["code"] == "request_timeout"
    assert 0.6 <= time.perf_counter() - started < 5
    assert len(jobs) == 2 and all(j.cancelled for j in jobs)


def test_the_time_limit_ends_a_started_stream_cleanly(stalled):
    app, url, jobs = stalled
    app.request_timeout = 0.5
    sock = _send_raw(url, {"prompt": "Th", "max_tokens": 5, "stream": True})
    _wait(lambda: len(jobs) == 1)
    jobs[0].put(("delta", "Hello", []))  # the scheduler's first tokens, then nothing
    raw = sock.makefile("rb").read().decode()
    sock.close()
    assert raw.startswith("HTTP/1.1 200")
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["text"] == "Hello"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert events[-1] == "[DONE]" and jobs[0].cancelled
