"""What the reliability campaign sent the server: each case answered with JSON, never a 5xx,
a stall or a traceback (each of these failed before its fix)."""

import contextlib
import logging
import socket
import statistics
import time

import pytest
from serving_helpers import request, start_server


def _raw(url, data: bytes, read_all=True) -> bytes:
    """Sends raw bytes on a fresh connection; returns everything until the server closes."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if not read_all:
            return sock.recv(65536)
        # the server may already have answered and closed: then read what it sent
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _post(path: str, body: bytes, length: str | None = None) -> bytes:
    length = str(len(body)) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    return head.encode("utf-8") + body


@pytest.mark.parametrize(
    "data",
    [
        _post("/v1/completions", b'{"prompt": "Th"}', length="\u00b2"),  # "²".isdigit()
        _post("/v1/completions", b'{"prompt": "Th", "seed": ' + b"9" * 5000 + b"}"),
        _post("/v1/completions", b'{"prompt": "Th", "temperature": 1' + b"0" * 400 + b"}"),
        _post("/v1/completions", b'{"prompt": "Th", "top_p": 1e400}'),
        _post("/v1/completions", b'{"prompt": "Th", "max_tokens": ' + b"1" * 400 + b"}"),
        _post("/v1/completions", b'{"prompt": "Th", "top_k": -1}'),
        _post("/v1/models/tiny:predict", b'{"instances": [[' + b"7" * 5000 + b"]]}"),
        _post("/detokenize", b'{"tokens": [' + b"7" * 4000 + b"]}"),
        _post("/tokenize", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
        _post("/v1/chat/completions", b'{"messages": [], "response_format": {"type": 1}}'),
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ],
)
def test_client_input_never_gets_a_5xx(server, data):
    answer = _raw(server[2], data).decode("utf-8", "replace")
    status = int(answer.split(" ", 2)[1])
    assert 400 <= status < 500, answer
    assert '"error"' in answer and "<html" not in answer.lower()


def test_unsupported_methods_get_json_405_with_allow(server):
    for method, path, allow in [("PATCH", "/v1/completions", "POST"), ("BREW", "/health", "GET")]:
        answer = _raw(server[2], f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()).decode()
        assert answer.startswith("HTTP/1.1 405"), answer
        assert f"Allow: {allow}" in answer and '"method_not_allowed"' in answer


def test_a_get_body_is_drained_not_read_as_the_next_request(server):
    smuggled = b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"
    first = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
    second = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = _raw(server[2], first + smuggled + second).decode()
    assert answer.count("HTTP/1.1 ") == 2, answer  # not 3: the body was no request
    assert "404" not in answer.split("\r\n")[0] and '"object": "list"' in answer


def test_keep_alive_answers_do_not_wait_for_nagle(server):
    """Headers and body in one write with TCP_NODELAY: a keep-alive round trip takes about a
    millisecond; with two writes under Nagle's algorithm it took ~44 ms (delayed ACK)."""
    port = int(server[2].rsplit(":", 1)[1])
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(12):
        started = time.perf_counter()
        conn.request("GET", "/health")
        conn.getresponse().read()
        times.append(time.perf_counter() - started)
    conn.close()
    assert statistics.median(times[2:]) < 0.02, times


def test_control_characters_are_escaped_in_the_log(server, caplog):
    with caplog.at_level(logging.INFO, logger="deepseek_tf.serving"):
        _raw(server[2], b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records]
    assert any("\\x1b[31mred\\x07" in line for line in lines), lines
    assert not any("\x1b" in line or "\x07" in line for line in lines)


def test_a_client_leaving_during_an_error_reply_is_no_traceback(server, caplog):
    from deepseek_tf.serving.api_errors import ApiError
    from deepseek_tf.serving.handler import Handler

    class Gone:
        def write(self, data):
            raise BrokenPipeError(32, "Broken pipe")

    handler = Handler.__new__(Handler)  # only the error path: no socket needed
    handler.wfile, handler.request_version, handler.requestline = Gone(), "HTTP/1.1", "POST /"
    handler.client_address, handler.command, handler.server = ("127.0.0.1", 1), "POST", server[0]
    handler.close_connection = False
    handler._error(ApiError(400, "bad"))  # no exception escapes
    assert handler.close_connection
    with caplog.at_level(logging.INFO, logger="deepseek_tf.serving"):
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            server[0].handle_error(None, ("127.0.0.1", 1))
    assert not any(r.exc_info for r in caplog.records)


def test_connections_are_capped_and_predict_respects_the_queue(loaded):
    srv, app, url = start_server(*loaded, max_connections=2, max_queue=0)
    port = int(url.rsplit(":", 1)[1])
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.2)
        answer = _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").decode()
        assert answer.startswith("HTTP/1.1 503") and '"busy"' in answer
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        assert request(url, "GET", "/health")[0] == 200
        status, body = request(url, "POST", "/v1/models/tiny:predict", {"instances": [[1, 2]]})
        assert status == 429 and body["error"]["code"] == "server_busy"
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"chunk": 0}, "--chunk"),
        ({"chunk": -1}, "--chunk"),
        ({"max_body_bytes": 0}, "--max-body-bytes"),
        ({"max_queue": -1}, "--max-queue"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"max_batch": 0}, "--max-batch"),
        ({"window_s": float("nan")}, "--batch-window-ms"),
        ({"max_connections": 0}, "--max-connections"),
    ],
)
def test_server_options_are_validated(loaded, kwargs, message):
    from deepseek_tf.errors import InputError
    from deepseek_tf.serving.server import ServingApp

    with pytest.raises(InputError, match=message):
        ServingApp(*loaded, "tiny", **kwargs)


def test_bind_errors_are_one_line(loaded):
    from deepseek_tf.errors import InputError
    from deepseek_tf.serving.server import ServingApp, make_server

    app = ServingApp(*loaded, "tiny")
    with pytest.raises(InputError, match="0-65535"):
        make_server(app, "127.0.0.1", 70000)
    with pytest.raises(InputError, match="cannot be resolved"):
        make_server(app, "no-such-host.invalid", 0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(InputError, match="already in use"):
            make_server(app, "127.0.0.1", taken.getsockname()[1])
