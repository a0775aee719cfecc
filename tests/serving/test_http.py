"""Plain HTTP: predict, health, error answers, API keys, disconnects, fuzzing."""

import json
import socket
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import request, start_server


def test_health_and_models(server):
    status, body = request(server[2], "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    status, body = request(server[2], "GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny"
    status, body = request(server[2], "GET", "/v1/models/tiny")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"


def test_predict_rows_and_columns(server, loaded):
    model, tok = loaded
    rows = [tok.encode("ROMEO:"), tok.encode("Th")]
    logits = [np.asarray(model(np.asarray([r], np.int32)))[0, -1] for r in rows]
    status, body = request(server[2], "POST", "/v1/models/tiny:predict", {"instances": rows})
    assert status == 200
    assert body["predictions"] == [int(np.argmax(x)) for x in logits]
    status, body = request(
        server[2],
        "POST",
        "/v1/models/tiny:predict",
        {"inputs": rows, "signature_name": "logits"},
    )
    assert status == 200
    np.testing.assert_allclose(body["outputs"], logits, atol=1e-4)


BAD = [
    ("/v1/completions", {"model": "tiny"}, 400),  # no prompt
    ("/v1/completions", {"prompt": ""}, 400),
    ("/v1/completions", {"prompt": "Th", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "Th", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"prompt": "Th", "max_tokens": "5"}, 400),
    ("/v1/completions", {"prompt": "Th", "temperature": "hot"}, 400),
    ("/v1/completions", {"prompt": "Th", "temperature": 9}, 400),
    ("/v1/completions", {"prompt": "Th", "n": 9}, 400),  # over MAX_CHOICES
    ("/v1/completions", {"prompt": "Th", "n": 0}, 400),
    ("/v1/completions", {"prompt": "Th", "stream": "yes"}, 400),
    ("/v1/completions", {"prompt": "Th", "stop": 5}, 400),
    ("/v1/completions", {"prompt": "Th " * 40}, 400),  # over the 48-token context
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, 400),  # token id out of range
    ("/v1/completions", {"prompt": "\u20ac"}, 400),  # not in the char vocabulary
    ("/v1/completions", {"prompt": "Th", "max_tokens": 33}, 400),  # over the server's 32
    ("/v1/completions", {"prompt": "Th" * 20, "max_tokens": 20}, 400),  # 40 + 20 > 48
    ("/v1/completions", {"prompt": "Th", "logprobs": 9}, 400),
    ("/v1/completions", {"prompt": "Th", "model": "other"}, 404),
    ("/v1/completions", [1, 2], 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/models/tiny:predict", {"instances": []}, 400),
    ("/v1/models/tiny:predict", {"instances": [["a"]]}, 400),
    ("/v1/models/tiny:predict", {"instances": [[1] * 100]}, 400),
    ("/v1/models/other:predict", {"instances": [[1]]}, 404),
    ("/v1/nothing", {}, 404),
]


@pytest.mark.parametrize("path,body,status", BAD)
def test_bad_requests_get_json_4xx(server, path, body, status):
    got, answer = request(server[2], "POST", path, body)
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "code"}


def test_invalid_json_oversize_and_methods_then_still_serving(server):
    url = server[2]
    status, body = request(url, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = request(url, "POST", "/v1/completions", raw=b"\xff\xfe")
    assert status == 400
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:  # announces 2 MiB, sends 4 B
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n{}{}"
        )
        answer = sock.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.1 413") and "request_too_large" in answer
    status, _ = request(url, "GET", "/v1/completions")
    assert status == 405
    status, body = request(url, "POST", "/v1/completions", {"prompt": "Th", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_api_key(loaded):
    srv, app, url = start_server(*loaded, api_key="sekret")
    try:
        body = {"prompt": "Th", "max_tokens": 2}
        status, answer = request(url, "POST", "/v1/completions", body)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        assert request(url, "POST", "/v1/completions", body, wrong)[0] == 401
        assert request(url, "GET", "/v1/models")[0] == 401
        assert request(url, "GET", "/health")[0] == 200
        ok = {"Authorization": "Bearer sekret"}
        assert request(url, "POST", "/v1/completions", body, ok)[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()


def test_client_disconnect_mid_stream_frees_the_slot(server):
    url = server[2]
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "Th", "max_tokens": 30, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()  # gone mid-stream
    time.sleep(0.2)
    status, answer = request(url, "POST", "/v1/completions", {"prompt": "Th", "max_tokens": 4})
    assert status == 200 and answer["usage"]["completion_tokens"] == 4


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["tiny", "x"]) | json_values,
        "prompt": st.sampled_from(["Th", "", "ROMEO:"]) | json_values,
        "messages": st.just([{"role": "user", "content": "Hi"}]) | json_values,
        "max_tokens": st.integers(-3, 60) | json_values,
        "temperature": st.floats(-1, 3) | json_values,
        "top_p": json_values,
        "n": st.integers(0, 2) | json_values,
        "stop": json_values,
        "stream": st.booleans() | json_values,
        "logprobs": st.integers(-1, 6) | json_values,
        "seed": json_values,
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=fields | json_values,
)
def test_fuzzed_bodies_never_5xx(server, path, body):
    status, answer = request(server[2], "POST", path, body)
    assert status < 500, answer
    if status >= 400:
        assert "error" in answer


def test_abandoned_job_is_dropped_from_its_batch(loaded):
    """A job whose client went away after its first chunk gets no more tokens."""
    from deepseek_tf.serving.batcher import Batcher
    from deepseek_tf.serving.protocol import GenRequest

    model, tok = loaded
    batcher = Batcher(model, tok, max_batch=4, chunk=4)
    keep = GenRequest("completion", "m", "Th", tok.encode("Th"), max_tokens=20, temperature=0)
    gone = GenRequest("completion", "m", "Th", tok.encode("Th"), max_tokens=20, temperature=0)
    jobs = [batcher.submit(keep), batcher.submit(gone)]
    feed = jobs[1].feed

    def feed_then_leave(new):
        feed(new)
        jobs[1].cancelled = True

    jobs[1].feed = feed_then_leave
    batcher._decode(batcher._collect())
    assert len(jobs[0].tokens) == 20 and jobs[0].finish_reason == "length"
    assert len(jobs[1].tokens) <= 4 and batcher.abandoned == 1


def test_full_queue_answers_429(loaded):
    srv, app, url = start_server(*loaded, max_queue=0)
    try:
        status, answer = request(url, "POST", "/v1/completions", {"prompt": "Th"})
        assert status == 429 and answer["error"]["code"] == "server_busy"
        assert request(url, "GET", "/health")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()
