"""The HTTP app: OpenAI-compatible completions/chat, TF-Serving predict, health.

Built on the standard library's `ThreadingHTTPServer` (no extra dependency):
one thread per connection, generation funnelled through a `Batcher`.

Endpoints:
    GET  /health                      -> {"status": "ok", ...} (never needs the API key)
    GET  /v1/models                   -> the one served model
    GET  /v1/models/NAME              -> OpenAI's model object + TF-Serving's version status
    POST /v1/completions              -> OpenAI text completion (stream, logprobs, stop, ...)
    POST /v1/chat/completions         -> OpenAI chat completion (template: `protocol`)
    POST /v1/models/NAME:predict      -> TF-Serving predict: next token of each instance.
        `{"instances": [[ids], ...]}` -> `{"predictions": [id, ...]}` (argmax of the
        last position's logits); `{"inputs": ...}` -> `{"outputs": [...]}` as TF-Serving's
        columnar format does. `"signature_name": "logits"` returns the last position's
        logits (a list of vocab_size floats) instead of the argmax id.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tensorflow as tf

from deepseek_tf.serving.batcher import Batcher, Job
from deepseek_tf.serving.protocol import (
    ApiError,
    Limits,
    bad,
    finalize_prompt,
    parse_generation,
    parse_predict,
)
from deepseek_tf.serving.responses import StreamChunks, completion_body

log = logging.getLogger("deepseek_tf.serving")


class ServingApp:
    """Model, tokenizer, limits and batcher shared by all request handlers."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        *,
        api_key: str | None = None,
        max_batch: int = 16,
        window_s: float = 0.005,
        chunk: int = 8,
        max_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        max_body_bytes: int = 1 << 20,
        max_queue: int = 256,
        jit_compile: bool = True,
    ):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.api_key = api_key
        context = model.max_seq_len
        self.limits = Limits(
            context=context,
            max_prompt_tokens=min(max_prompt_tokens or context, context),
            max_tokens=min(max_tokens or context, context),
            max_body_bytes=max_body_bytes,
        )
        self.max_queue = max_queue  # waiting requests beyond this are answered 429
        self.batcher = Batcher(model, tokenizer, max_batch, window_s, chunk, jit_compile)
        self.created = int(time.time())
        self._last_logits = tf.function(self._last_logits_fn, reduce_retracing=True)

    def _last_logits_fn(self, ids, lengths):
        logits = self.model(ids, training=False)  # (B, T, V)
        return tf.gather(logits, lengths - 1, axis=1, batch_dims=1)  # (B, V)

    def predict(self, body) -> dict:
        rows, columnar = parse_predict(body, self.limits, self.model.vocab_size)
        signature = body.get("signature_name", "serving_default")
        if signature not in ("serving_default", "predict", "argmax", "logits"):
            raise bad(
                f"unknown signature_name {signature!r} (serving_default, logits)", "signature_name"
            )
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r  # right padding: causal, so it cannot change earlier logits
        lengths = np.asarray([len(r) for r in rows], np.int32)
        logits = self._last_logits(tf.constant(ids), tf.constant(lengths)).numpy()
        if signature == "logits":
            out = [[float(v) for v in row] for row in logits]
        else:
            out = [int(i) for i in logits.argmax(-1)]
        return {"outputs": out} if columnar else {"predictions": out}

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "deepseek-tf",
                }
            ],
        }

    def model_status(self) -> dict:
        """`GET /v1/models/NAME`: OpenAI's model object plus TF-Serving's status fields."""
        status = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK"}}
        return {**self.models()["data"][0], "model_version_status": [status]}

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_name,
            "context": self.limits.context,
            "batches": self.batcher.batches,
            "rows": self.batcher.rows,
        }


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection; `server.app` is the `ServingApp`."""

    protocol_version = "HTTP/1.1"
    server_version = "deepseek-tf"
    timeout = 120  # seconds a connection may stall (a half-sent body, an idle keep-alive)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.info("%s %s", self.address_string(), format % args)

    @property
    def app(self) -> ServingApp:
        return self.server.app

    # -- plumbing ----------------------------------------------------------------------
    def _send_json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError, close: bool = False) -> None:
        self._send_json(e.status, e.body(), close)

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

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self.close_connection = True
            raise ApiError(
                411,
                "a Content-Length header is required",
                "invalid_request_error",
                "length_required",
            )
        if not length.isdigit():
            self.close_connection = True
            raise bad("invalid Content-Length header")
        length = int(length)
        if length > self.app.limits.max_body_bytes:
            self.close_connection = True  # the body is left unread
            raise ApiError(
                413,
                f"the request body is over {self.app.limits.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            )
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ApiError(
                400, f"invalid JSON body: {e}", "invalid_request_error", "invalid_json"
            ) from None

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self._body_read = False
        try:
            if method == "GET" and path == "/health":
                return self._send_json(200, self.app.health())
            self._check_auth()
            routes = {
                "/v1/models": ("GET",),
                "/v1/completions": ("POST",),
                "/v1/chat/completions": ("POST",),
            }
            is_predict = path.startswith("/v1/models/") and path.endswith(":predict")
            if method == "GET" and path == f"/v1/models/{self.app.model_name}":
                return self._send_json(200, self.app.model_status())
            if path not in routes and not is_predict and path != "/health":
                raise ApiError(404, f"no route {path}", "invalid_request_error", "not_found")
            allowed = ("POST",) if is_predict else routes.get(path, ("GET",))
            if method not in allowed:
                raise ApiError(
                    405,
                    f"{method} is not allowed on {path}",
                    "invalid_request_error",
                    "method_not_allowed",
                )
            if path == "/v1/models":
                return self._send_json(200, self.app.models())
            body = self._read_json()
            if is_predict:
                name = path[len("/v1/models/") : -len(":predict")]
                if name != self.app.model_name:
                    raise ApiError(
                        404,
                        f"model '{name}' is not served here",
                        "invalid_request_error",
                        "model_not_found",
                    )
                return self._send_json(200, self.app.predict(body))
            if self.app.batcher.pending() >= self.app.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy ({self.app.max_queue} requests waiting); retry later",
                    "rate_limit_error",
                    "server_busy",
                )
            kind = "chat" if path == "/v1/chat/completions" else "completion"
            req = parse_generation(body, kind, self.app.limits, self.app.model_name)
            finalize_prompt(req, self.app.tokenizer, self.app.limits, self.app.model.vocab_size)
            self._generate(req)
        except ApiError as e:
            if not self._body_read and self.headers.get("Content-Length", "0") != "0":
                self.close_connection = True  # an unread body would be taken for a request
            self._error(e, close=self.close_connection)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug, not the client's fault: 500, and keep serving
            log.exception("request failed")
            self._error(ApiError(500, "internal server error", "server_error", "internal"))

    def do_GET(self):  # noqa: N802 - the base class's naming
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    # -- generation --------------------------------------------------------------------
    def _generate(self, req) -> None:
        job = self.app.batcher.submit(req)
        rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            if req.stream:
                self._stream(job, rid)
            else:
                self._complete(job, rid)
        finally:
            job.cancelled = True  # no-op when finished; frees the slot when the client left

    def _complete(self, job: Job, rid: str) -> None:
        text, entries = "", []
        while True:
            event = job.events.get()
            if event[0] == "delta":
                text += event[1]
                entries += event[2]
            elif event[0] == "error":
                raise RuntimeError(event[1])
            else:
                break
        self._send_json(
            200, completion_body(job, rid, self.app.model_name, text, entries, event[1])
        )

    def _sse(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, job: Job, rid: str) -> None:
        first = job.events.get()  # wait for the first tokens: errors can still be JSON
        if first[0] == "error":
            raise RuntimeError(first[1])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        chunks = StreamChunks(job, rid, self.app.model_name)
        if chunks.opening is not None:
            self._sse(chunks.opening)
        event = first
        while event[0] == "delta":
            self._sse(chunks.delta(event[1], event[2]))  # raises when the client has gone
            event = job.events.get()
        if event[0] == "error":
            return  # headers are sent: end the stream without [DONE]
        for payload in chunks.closing(event[1]):
            self._sse(payload)


class ServingHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` carrying the `ServingApp`."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops bursts of connections (1 s SYN retries)

    def __init__(self, address, app: ServingApp):
        super().__init__(address, Handler)
        self.app = app


def make_server(app: ServingApp, host: str = "127.0.0.1", port: int = 8000) -> ServingHTTPServer:
    """Binds the server and starts the batcher (call `serve_forever()` next)."""
    server = ServingHTTPServer((host, port), app)
    app.batcher.start()
    return server
