"""One HTTP connection: parsing, routing, JSON answers and server-sent events.

Built on the standard library's `BaseHTTPRequestHandler` (HTTP/1.1 keep-alive). Whatever a
client sends gets a JSON answer or a clean close, never a 5xx or the standard library's
HTML pages: a body is always read (or the connection closed) before the next request on
the connection; unknown methods get 405 with `Allow`; malformed request lines get JSON
400s; a client that leaves mid-answer ends its connection quietly. Each answer goes out in
one write with `TCP_NODELAY` (two small writes under Nagle's algorithm cost a delayed-ACK
round, ~40 ms, on every keep-alive request).

Every answered request is counted in `app.metrics` by route template (a client that left
before its answer counts as 499). A generation waits for its events in short slices: a
client that closed its connection, or a request past `app.request_timeout` (408, or an
error event that ends the stream), cancels its job. `/health` answers 503 while the server
is not ready (its `status` is not "ok").
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import re
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler

from deepseek_tf.serving import endpoints
from deepseek_tf.serving.api_errors import ApiError, bad
from deepseek_tf.serving.job import Job
from deepseek_tf.serving.protocol import finalize_prompt, parse_generation
from deepseek_tf.serving.responses import StreamChunks, completion_body

log = logging.getLogger("deepseek_tf.serving")

DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
POLL_S = 0.05  # a waiting generation checks its client and its deadline this often
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first


class ClientGone(ConnectionAbortedError):
    """The client closed its connection while its generation ran."""


_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII digits only ("²".isdigit() is True)


def printable(text: str, limit: int = 300) -> str:
    """`text` with control characters escaped, cut to `limit` characters (for logs)."""
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection; `server.app` is the `ServingApp`."""

    protocol_version = "HTTP/1.1"
    server_version = "deepseek-tf"
    timeout = 120  # seconds a connection may stall (a half-sent body, an idle keep-alive)
    _endpoint, _responded = "other", False  # per request (set in handle_one_request)

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle_one_request(self):
        self._endpoint, self._responded = "other", False
        super().handle_one_request()

    def send_response(self, code, message=None):
        # counted before the client can read the response, so a client that asks
        # /metrics next sees its own request counted
        self._responded = True
        self.app.metrics.request(self._endpoint, code)
        super().send_response(code, message)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.info("%s %s", self.address_string(), printable(format % args))

    def __getattr__(self, name):
        # The base class answers a method without a `do_<METHOD>` with an HTML 501: route
        # every method through `_dispatch` instead (405 with `Allow` where not allowed).
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    @property
    def app(self):
        return self.server.app

    # -- plumbing ----------------------------------------------------------------------
    def _send_json(self, status: int, body: dict, close: bool = False, headers=()) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", close, headers)

    def _send(self, status: int, data: bytes, content_type: str, close=False, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        head = getattr(self, "_headers_buffer", [])  # none for an HTTP/0.9 request
        self.wfile.write(b"".join([*head, b"\r\n" if head else b""]) + data)  # one write
        self._headers_buffer = []

    def send_error(self, code, message=None, explain=None):
        """The standard library's error page (bad request line, oversized headers), as
        JSON; the connection is closed (the stream may be out of step). A request the
        client got wrong is a 4xx: the standard library's 505 for an HTTP version other
        than 1.x becomes a 400."""
        code = 400 if code == 505 else code
        error = ApiError(code, message or "bad request", "invalid_request_error", "bad_request")
        if self.request_version == "HTTP/0.9":  # unparsed: answer with an HTTP/1.1 status line
            self.request_version = "HTTP/1.1"
        try:
            self._send_json(code, error.body(), close=True)
        except DISCONNECTS:
            self.close_connection = True

    def _error(self, e: ApiError, close: bool = False) -> None:
        headers = [("Allow", e.allow)] if getattr(e, "allow", None) else []
        if e.status == 429:
            headers.append(("Retry-After", "1"))
        try:
            self._send_json(e.status, e.body(), close, headers)
        except DISCONNECTS:  # the client left while we answered: nothing more to say
            self.close_connection = True

    def _check_auth(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(
                401,
                "invalid or missing API key (Authorization: Bearer KEY)",
                "invalid_request_error",
                "invalid_api_key",
            )

    def _read_body(self, required: bool) -> bytes:
        """The request body (drained even where it is ignored, so that it is not read as
        the next request); `required`: a POST must declare its length."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(
                411, "chunked bodies are not supported; send Content-Length",
                "invalid_request_error", "length_required",
            )  # fmt: skip
        if length is None:
            if required:
                self.close_connection = True
                raise ApiError(
                    411, "a Content-Length header is required",
                    "invalid_request_error", "length_required",
                )  # fmt: skip
            return b""
        if not _DIGITS.fullmatch(length.strip()):
            self.close_connection = True
            raise bad("invalid Content-Length header")
        size = int(length)
        if size > self.app.limits.max_body_bytes:
            self.close_connection = True  # the body is left unread
            raise ApiError(
                413,
                f"the request body is over {self.app.limits.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            )
        data = self.rfile.read(size)
        if len(data) < size:  # the client stopped sending
            self.close_connection = True
            raise bad("the request body is shorter than its Content-Length")
        return data

    @staticmethod
    def _json(raw: bytes):
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # incl. >4300 digits
            raise ApiError(
                400,
                f"invalid JSON body: {printable(str(e), 200)}",
                "invalid_request_error",
                "invalid_json",
            ) from None

    def _route(self, method: str, path: str) -> None:
        """Raises 404/405 unless `method` is allowed on `path`."""
        allowed = endpoints.allowed_methods(path)
        if allowed is None:
            raise ApiError(404, f"no route {printable(path, 80)}", "invalid_request_error",
                           "not_found")  # fmt: skip
        if method not in allowed:
            error = ApiError(
                405,
                f"{printable(method, 20)} is not allowed on {path} (allowed: {', '.join(allowed)})",
                "invalid_request_error",
                "method_not_allowed",
            )
            error.allow = ", ".join(allowed)
            raise error

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self._endpoint = endpoints.endpoint(path)
        try:
            body = self._read_body(required=method == "POST")
            self._route(method, path)
            if self._endpoint in endpoints.PUBLIC:
                return self._public(path)
            self._check_auth()
            if path == "/v1/models":
                return self._send_json(200, self.app.models())
            if method == "GET":  # /v1/models/NAME
                return self._send_json(200, self.app.model_status(path[len("/v1/models/") :]))
            request = self._json(body)
            if path in ("/tokenize", "/detokenize"):
                answer = getattr(endpoints, path[1:])(self.app, request)
                return self._send_json(200, answer)
            if path.endswith(":predict"):
                name = path[len("/v1/models/") : -len(":predict")]
                return self._send_json(200, self.app.predict(name, request))
            kind = "chat" if path == "/v1/chat/completions" else "completion"
            req = parse_generation(
                request, kind, self.app.limits, self.app.model_name, self.app.adapter_names
            )
            finalize_prompt(req, self.app.tokenizer, self.app.limits, self.app.model.vocab_size)
            self._generate(req)
        except ApiError as e:
            self._error(e, close=self.close_connection)
        except DISCONNECTS:
            self.close_connection = True
            if not self._responded:
                self.app.metrics.request(self._endpoint, CLIENT_GONE)
        except Exception:  # a bug, not the client's fault: 500, and keep serving
            log.exception("request failed")
            self._error(ApiError(500, "internal server error", "server_error", "internal"), True)

    def _public(self, path: str) -> None:
        """The answers that need no API key: health, metrics, the chat page."""
        if path == "/health":
            health = self.app.health()
            return self._send_json(200 if health.get("status") == "ok" else 503, health)
        if path == "/metrics":
            return self._send(200, *self.app.metrics.render())
        data, content_type = endpoints.static_file(path)
        self._send(200, data, content_type, headers=endpoints.PAGE_HEADERS)

    # -- generation --------------------------------------------------------------------
    def _generate(self, req) -> None:
        limit = self.app.request_timeout
        self._deadline = None if limit is None else time.perf_counter() + limit
        self._checked = time.perf_counter()
        events: queue.Queue = queue.Queue()  # the choices' events, tagged with their index
        jobs = []
        try:
            for i in range(req.n):
                jobs.append(self.app.submit(req, events, i))  # 429 when the queue is full
            rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
            if req.stream:
                self._stream(jobs, events, rid)
            else:
                self._complete(jobs, events, rid)
        finally:
            for job in jobs:  # no-op when finished; frees the slots when the client left
                job.cancelled = True

    def _client_gone(self) -> bool:
        """The client closed its side (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next_event(self, jobs: list[Job], events: queue.Queue):
        """The next `(index, event)` of the request's jobs; cancels them when the client
        leaves or time runs out."""
        while True:
            now = time.perf_counter()
            if self._deadline is not None and now > self._deadline:
                for job in jobs:
                    job.cancelled = True
                raise ApiError(
                    408,
                    f"the request ran past this server's limit of {self.app.request_timeout:g} s",
                    "invalid_request_error",
                    "request_timeout",
                )
            if now - self._checked >= POLL_S:  # at most every POLL_S while tokens flow
                self._checked = now
                if self._client_gone():
                    for job in jobs:
                        job.cancelled = True
                    raise ClientGone("the client closed the connection")
            try:
                return events.get(timeout=POLL_S)
            except queue.Empty:
                pass

    def _complete(self, jobs: list[Job], events: queue.Queue, rid: str) -> None:
        texts, entries, reasons = [""] * len(jobs), [[] for _ in jobs], [None] * len(jobs)
        while None in reasons:
            index, event = self._next_event(jobs, events)
            if event[0] == "delta":
                texts[index] += event[1]
                entries[index] += event[2]
            elif event[0] == "error":
                raise RuntimeError(event[1])
            else:
                reasons[index] = event[1]
        results = list(zip(jobs, texts, entries, reasons))
        self._send_json(200, completion_body(results, rid, jobs[0].req.model))

    def _sse(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, jobs: list[Job], events: queue.Queue, rid: str) -> None:
        first = self._next_event(jobs, events)  # wait for tokens: errors can still be JSON
        if first[1][0] == "error":
            raise RuntimeError(first[1][1])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        chunks = [StreamChunks(job, rid, job.req.model) for job in jobs]
        for c in chunks:
            if c.opening is not None:
                self._sse(c.opening)
        (index, event), ended = first, 0
        try:
            while True:
                if event[0] == "delta":
                    self._sse(chunks[index].delta(event[1], event[2]))  # raises if client left
                elif event[0] == "error":
                    return  # headers are sent: end the stream without [DONE]
                else:
                    ended += 1
                    for payload in chunks[index].closing(event[1]):
                        self._sse(payload)
                    if ended == len(jobs):
                        break
                index, event = self._next_event(jobs, events)
        except ApiError as e:  # past the time limit: say so, then end the stream
            self._sse(e.body())
            self._sse("[DONE]")
            return
        if jobs[0].req.include_usage:
            self._sse(chunks[0].usage_chunk(jobs))
        self._sse("[DONE]")
