"""The HTTP app: OpenAI-compatible completions/chat, TF-Serving predict, health.

Built on the standard library's `ThreadingHTTPServer` (no extra dependency): one thread
per connection (at most `max_connections`; beyond that a connection is answered 503 and
closed), generation funnelled through the continuous-batching `ContinuousScheduler`
(or, with `batching="dynamic"`, the older `Batcher`), at most `max_queue` requests
waiting (completions and predictions alike; beyond that 429 with `Retry-After`).

Endpoints:
    GET  /health                      -> {"status": "ok", ...} (never needs the API key);
                                         503 {"status": "loading"} while compiling
    GET  /v1/models                   -> the served model and its LoRA adapters
    GET  /v1/models/NAME              -> OpenAI's model object + TF-Serving's version status
    POST /v1/completions              -> OpenAI text completion (stream, logprobs, stop, ...)
    POST /v1/chat/completions         -> OpenAI chat completion (the run's chat template)
    POST /v1/models/NAME:predict      -> TF-Serving predict: next token of each instance.
        `{"instances": [[ids], ...]}` -> `{"predictions": [id, ...]}` (argmax of the
        last position's logits); `{"inputs": ...}` -> `{"outputs": [...]}` as TF-Serving's
        columnar format does. `"signature_name": "logits"` returns the last position's
        logits (a list of vocab_size floats) instead of the argmax id.

A request naming a model other than the served one gets 404 `model_not_found` (as vLLM
does; llama.cpp's server answers any name).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import queue
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http.server import ThreadingHTTPServer

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import InputError
from deepseek_tf.generation.speculative import cannot_gain, check_draft_tokens
from deepseek_tf.models.multi_lora import Adapter, MultiLora
from deepseek_tf.serving.api_errors import ApiError, bad
from deepseek_tf.serving.batcher import Batcher
from deepseek_tf.serving.handler import DISCONNECTS, Handler
from deepseek_tf.serving.job import Job, Scheduler
from deepseek_tf.serving.kv_budget import plan_cache
from deepseek_tf.serving.metrics import ServerMetrics
from deepseek_tf.serving.protocol import Limits, parse_predict
from deepseek_tf.serving.scheduler import STEP_MS, ContinuousScheduler

log = logging.getLogger("deepseek_tf.serving")
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"


def _check_options(**options) -> None:
    """One-line `InputError`s for server options out of range (named as CLI flags)."""
    for name, (value, low) in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value < low:
            raise InputError(f"{flag}: must be a number >= {low}, got {value!r}")


class ServingApp:
    """Model, tokenizer, limits and scheduler (`batcher`, a `serving.job.Scheduler`)
    shared by all request handlers.

    Args:
        model, tokenizer: the served run (tokenizer None: token ids only).
        model_name: the served model id.
        api_key: require `Authorization: Bearer KEY` (None: no key).
        max_batch: most rows decoded together (the continuous batch's slots).
        batching: "continuous" (requests join and leave between decode steps) or
            "dynamic" (a batch runs to its end; `window_s` and `chunk` apply).
        window_s: dynamic batching: how long the first waiting request waits for company.
        chunk: dynamic batching: tokens decoded between checks (stop strings, streaming).
        step_ms: continuous batching: target duration of one decode call.
        stream_interval: continuous batching: most tokens per call while a request streams.
        prefix_cache_mb: continuous batching: memory for cached prompt prefixes (0: off).
        request_timeout: seconds a generation may take (None: no limit).
        speculative: "mtp": speculative decoding with the model's MTP modules
            (`draft_tokens` drafts per round, None: one per module); it runs in the
            dynamic batcher (rows of a batch share positions). None: off.
        warm_up: compile the serving shapes before `/health` reports ready.
        max_model_len: positions a prompt and its reply may take (None: the
            checkpoint's context, lowered to what `kv_cache_memory` holds).
        kv_cache_memory: the decoding cache's budget, "4GiB" or bytes (None: a quarter
            of the memory available at start-up; see `serving.kv_budget`).
        max_tokens, max_prompt_tokens: request limits (None: `max_model_len`).
        max_body_bytes: largest request body.
        max_queue: requests waiting (or predicting) beyond this get 429.
        max_connections: open connections beyond this get 503.
        jit_compile: compile the decode loop with XLA.
        adapters: LoRA adapters served beside the model (`models.multi_lora.read_adapter`),
            each selected by a request's `model` naming it (continuous batching only).
    """

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        *,
        api_key: str | None = None,
        max_batch: int = 16,
        batching: str = "continuous",
        window_s: float = 0.005,
        chunk: int = 8,
        step_ms: float = STEP_MS,
        stream_interval: int = 16,
        prefix_cache_mb: float = 256,
        request_timeout: float | None = None,
        speculative: str | None = None,
        draft_tokens: int | None = None,
        max_model_len: int | None = None,
        kv_cache_memory: str | int | None = None,
        max_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        max_body_bytes: int = 1 << 20,
        max_queue: int = 256,
        max_connections: int = 256,
        jit_compile: bool = True,
        warm_up: bool = True,
        adapters: Sequence[Adapter] = (),
    ):
        _check_options(
            max_batch=(max_batch, 1),
            batch_window_ms=(window_s, 0),
            chunk=(chunk, 1),
            max_tokens=(max_tokens, 1),
            max_prompt_tokens=(max_prompt_tokens, 1),
            max_body_bytes=(max_body_bytes, 1),
            max_queue=(max_queue, 0),
            max_connections=(max_connections, 1),
            step_ms=(step_ms, 0.1),
            stream_interval=(stream_interval, 1),
            prefix_cache_mb=(prefix_cache_mb, 0),
            request_timeout=(request_timeout, 0.001),
        )
        if batching not in ("continuous", "dynamic"):
            raise InputError(f"--batching: continuous or dynamic, got {batching!r}")
        if speculative not in (None, "mtp"):
            raise InputError(f"--speculative: mtp (or off), got {speculative!r}")
        drafts = check_draft_tokens(model, draft_tokens) if speculative else None
        note = cannot_gain(model) if speculative else None
        if note:  # said, not refused: the replies are the same, only slower
            log.warning(note)
        if adapters and (speculative or batching != "continuous"):
            flag = "--speculative" if speculative else "--batching dynamic"
            raise InputError(f"--lora: adapters are served by continuous batching, not {flag}")
        names = [a.name for a in adapters]
        if model_name in names or len(set(names)) < len(names):
            raise InputError(f"--lora: adapter names must differ from each other and from "
                             f"the model's name {model_name!r}")  # fmt: skip
        self.adapter_names = tuple(names)
        self.lora = MultiLora(model, list(adapters), max_batch) if adapters else None
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.api_key = api_key
        self.cache_plan = plan_cache(model, max_batch, max_model_len, kv_cache_memory)
        context = self.cache_plan.max_model_len
        if max_prompt_tokens is not None and max_prompt_tokens >= context:
            raise InputError(f"--max-prompt-tokens {max_prompt_tokens} leaves no room to reply "
                             f"within --max-model-len {context:,}")  # fmt: skip
        self.limits = Limits(
            context=context,
            max_prompt_tokens=min(max_prompt_tokens or context, context),
            max_tokens=min(max_tokens or context, context),
            max_body_bytes=max_body_bytes,
        )
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.speculative = bool(speculative)
        self.metrics = ServerMetrics(model_name)
        self.batcher: Scheduler
        if batching == "continuous" and not speculative:
            self.batcher = ContinuousScheduler(
                model, tokenizer, self.metrics, max_batch=max_batch, step_ms=step_ms,
                stream_interval=stream_interval,
                prefix_cache_mb=prefix_cache_mb, max_len=context, jit_compile=jit_compile,
                warm_up=warm_up, lora=self.lora,
            )  # fmt: skip
        else:
            self.batcher = Batcher(model, tokenizer, max_batch, window_s, chunk, jit_compile,
                                   speculative=drafts, metrics=self.metrics,
                                   warm_up=warm_up)  # fmt: skip
        self.created = int(time.time())
        self._predicting = 0
        self._lock = threading.Lock()
        self._last_logits = tf.function(
            self._last_logits_fn, reduce_retracing=True, autograph=False
        )

    # -- admission -------------------------------------------------------------------------
    def _busy(self) -> ApiError:
        return ApiError(
            429,
            f"the server is busy ({self.max_queue} requests waiting); retry later",
            "rate_limit_error",
            "server_busy",
        )

    def submit(self, req, events: queue.Queue | None = None, index: int = 0) -> Job:
        """Queues a generation request (choice `index` of it, its events to `events`: see
        `Job`), or raises 429 when `max_queue` requests wait."""
        if req.grammar is not None and not self.batcher.constrains:
            raise bad(
                f"'{req.schema_param}': structured output needs --batching continuous",
                req.schema_param,
            )
        if self.speculative and (req.logit_bias or req.penalties.active):
            param = "logit_bias" if req.logit_bias else "presence_penalty"
            raise bad(f"'{param}' (and penalties) are not supported with --speculative", param)
        with self._lock:
            if self.batcher.pending() + self._predicting >= self.max_queue:
                raise self._busy()
            return self.batcher.submit(req, events, index)

    @contextlib.contextmanager
    def _predict_slot(self):
        with self._lock:
            if self.batcher.pending() + self._predicting >= self.max_queue:
                raise self._busy()
            self._predicting += 1
        try:
            yield
        finally:
            with self._lock:
                self._predicting -= 1

    # -- endpoints -------------------------------------------------------------------------
    def _last_logits_fn(self, ids, lengths):
        logits = self.model(ids, training=False)  # (B, T, V)
        return tf.gather(logits, lengths - 1, axis=1, batch_dims=1)  # (B, V)

    def _check_name(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"model '{name[:80]}' is not served here (this server serves '{self.model_name}')",
                "invalid_request_error",
                "model_not_found",
            )

    def predict(self, name: str, body) -> dict:
        self._check_name(name)
        rows, columnar = parse_predict(body, self.limits, self.model.vocab_size)
        signature = body.get("signature_name", "serving_default")
        if signature not in ("serving_default", "predict", "argmax", "logits"):
            raise bad(
                f"unknown signature_name {str(signature)[:40]!r} (serving_default, logits)",
                "signature_name",
            )
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r  # right padding: causal, so it cannot change earlier logits
        lengths = np.asarray([len(r) for r in rows], np.int32)
        base = contextlib.nullcontext() if self.lora is None else self.lora.rows([])
        with self._predict_slot(), base:
            logits = self._last_logits(tf.constant(ids), tf.constant(lengths)).numpy()
        if signature == "logits":
            out = [[float(v) for v in row] for row in logits]
        else:
            out = [int(i) for i in logits.argmax(-1)]
        return {"outputs": out} if columnar else {"predictions": out}

    def models(self) -> dict:
        """The served model, then its LoRA adapters (`parent`: the model, as vLLM lists)."""
        entry = {"object": "model", "created": self.created, "owned_by": "deepseek-tf",
                 "max_model_len": self.limits.context}  # fmt: skip
        data = [{"id": self.model_name, **entry, "root": self.model_name, "parent": None}]
        for name in self.adapter_names:
            data.append({"id": name, **entry, "root": self.model_name,
                         "parent": self.model_name})  # fmt: skip
        return {"object": "list", "data": data}

    def model_status(self, name: str) -> dict:
        """`GET /v1/models/NAME`: OpenAI's model object plus TF-Serving's status fields."""
        entries = {m["id"]: m for m in self.models()["data"]}  # the model and its adapters
        if name not in entries:
            self._check_name(name)
        status = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK"}}
        return {**entries[name], "model_version_status": [status]}

    @property
    def ready(self) -> bool:
        """True once the scheduler has compiled its shapes."""
        return self.batcher.ready.is_set()

    def health(self) -> dict:
        """`status` is "loading" until the serving shapes are compiled, then "ok"."""
        body = {
            "status": "ok" if self.ready else "loading",
            "model": self.model_name,
            "context": self.limits.context,
            "rows": self.batcher.rows,
            "running": self.batcher.running(),
            "waiting": self.batcher.pending(),
            "kv_cache": {
                "slots": self.cache_plan.slots,
                "max_model_len": self.limits.context,
                "bytes": self.cache_plan.bytes,
                "budget": self.cache_plan.budget,
            },
        }
        prefix = self.batcher.prefix
        if prefix is not None and prefix.enabled:
            body["prefix_cache"] = {"entries": len(prefix), "hit_rate": round(prefix.hit_rate, 4)}
        return body


class ServingHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` carrying the `ServingApp`, with a cap on connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops bursts of connections (1 s SYN retries)

    def __init__(self, address, app: ServingApp):
        super().__init__(address, Handler)
        self.app = app
        self._slots = threading.BoundedSemaphore(app.max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):  # over the cap: answer and close
            body = b'{"error": {"message": "too many open connections", "code": "busy"}}'
            with contextlib.suppress(OSError):
                request.sendall(BUSY + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        """A client that vanished is not an error worth a traceback."""
        exc = sys.exc_info()[1]  # called from within the `except` of the failed request
        if isinstance(exc, (*DISCONNECTS, socket.timeout)):
            log.info("%s: connection closed (%s)", client_address[0], type(exc).__name__)
            return
        log.exception("connection from %s failed", client_address[0])


def check_port(port) -> None:
    """A one-line `InputError` for a port outside 0-65535 (0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"--port: must be in 0-65535 (0: any free port), got {port!r}")


def make_server(app: ServingApp, host: str = "127.0.0.1", port: int = 8000) -> ServingHTTPServer:
    """Binds the server and starts the batcher (call `serve_forever()` next).

    Raises:
        InputError: a port outside 0-65535, a host that does not resolve, an address in
            use or not available on this machine.
    """
    check_port(port)
    try:
        server = ServingHTTPServer((host, port), app)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r}: cannot be resolved ({e.strerror})") from None
    except OverflowError as e:
        raise InputError(f"--port {port}: {e}") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"--port {port}: {host}:{port} is already in use") from None
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    app.batcher.start()
    return server
