"""Deploying a run: `export` (SavedModel, LiteRT, ONNX, GGUF, verified) and `serve` (the
OpenAI-compatible HTTP server, returned running as a `Served`).

`deepseek-tf export` and `deepseek-tf serve` call these; their flags are the keywords
(`--no-verify` -> `verify=False`, `--no-warm-up` -> `warm_up=False`).

Examples:

>>> from deepseek_tf.api.deployment import export, serve                # doctest: +SKIP
>>> export("runs/tiny", format="savedmodel", out="exports/tiny")["signatures"]  # doctest: +SKIP
['generate', 'serving_default']
>>> with serve("runs/tiny", port=0) as served:                           # doctest: +SKIP
...     served.wait_ready()
...     print(served.url)
http://127.0.0.1:50123
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from deepseek_tf.export import check_export_options
from deepseek_tf.export import export as export_model
from deepseek_tf.models.footprint import check_fits
from deepseek_tf.rundir import RunDir, load_run
from deepseek_tf.serving.kv_budget import parse_size
from deepseek_tf.serving.lora_adapters import load_adapters, parse_lora, serving_config
from deepseek_tf.serving.scheduler import STEP_MS
from deepseek_tf.serving.server import ServingApp, ServingHTTPServer, check_port, make_server

__all__ = ["Served", "export", "serve"]


def export(
    run_dir,
    *,
    format: str,  # noqa: A002 - the command's flag
    out,
    prefill_len: int | None = None,
    int8: bool = False,
    quant: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> dict:
    """Exports a run's latest weights, reloads the artefact with its runtime and compares it
    with the Keras model.

    Args:
        run_dir: the run.
        format: "savedmodel" (a directory for TF Serving / saved_model_cli), "litert" (a
            .tflite file; `prefill_len`, `int8`), "onnx" (a .onnx file) or "gguf" (a .gguf
            file for llama.cpp / Ollama; `quant`); the last three need the `[export]` extra.
        out: the directory (savedmodel) or file (.tflite, .onnx, .gguf) to write.
        prefill_len: litert: fixed prompt length of the prefill signature (None:
            min(16, context)).
        int8: litert: dynamic-range int8 weight quantisation.
        quant: gguf: "bf16" (None), "q8_0", "q4_0" or "f32" (`deepseek_tf.export.gguf`).
        verify: reload the artefact and compare its logits with Keras'.
        overwrite: replace an existing `out`.

    Returns:
        The exporter's report: `format`, `path`, `signatures` and, verified, the
        `max_abs_logit_diff` (with format-specific figures).

    Raises:
        InputError: an existing `out` without `overwrite`, an unknown format, a
            LiteRT-only option with another format, an artefact that cannot be verified.
    """
    check_export_options(
        out, format, prefill_len=prefill_len, int8=int8, quant=quant, overwrite=overwrite
    )
    model, tokenizer = load_run(run_dir)  # slow: after the checks
    config = RunDir(run_dir).read_config()
    return export_model(model, out, format, tokenizer=tokenizer, prefill_len=prefill_len,
                        int8=int8, quant=quant, config=config, verify=verify,
                        overwrite=overwrite)  # fmt: skip


class Served:
    """A server started by `serve(..., block=False)`, serving on a background thread.

    Attributes:
        url: `http://HOST:PORT` (the port bound, also with `port=0`).
        app: the `ServingApp` (model, limits, scheduler, metrics).
        server: the HTTP server.

    A context manager: leaving the `with` block closes it.
    """

    def __init__(self, app: ServingApp, server: ServingHTTPServer, url: str):
        self.app, self.server, self.url = app, server, url
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = 600.0) -> bool:
        """Waits until `/health` answers 200 (shapes compiled); False after `timeout` s
        (None: no limit)."""
        return self.app.batcher.ready.wait(timeout)

    def join(self) -> None:
        """Serves until interrupted (Ctrl-C raises `KeyboardInterrupt` here), then closes."""
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)  # a timeout: signals reach this thread
        finally:
            self.close()

    def close(self) -> None:
        """Stops serving, frees the port and stops the scheduler."""
        self.server.shutdown()
        self.server.server_close()
        self.app.batcher.stop()
        self._thread.join(timeout=10)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(
    run_dir,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    warm_up: bool = True,
    model_name: str | None = None,
    max_batch: int = 16,
    no_batching: bool = False,
    batching: str = "continuous",
    step_ms: float = STEP_MS,
    stream_interval: int = 16,
    prefix_cache_mb: float = 256,
    request_timeout: float | None = None,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    max_model_len: int | None = None,
    kv_cache_memory: str | None = None,
    batch_window_ms: float = 5.0,
    chunk: int = 8,
    max_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    max_body_bytes: int = 1 << 20,
    max_queue: int = 256,
    max_connections: int = 256,
    lora: Sequence[str] | Mapping[str, str] | None = None,
    block: bool = False,
) -> Served:
    """Serves a run over HTTP: POST /v1/completions, /v1/chat/completions,
    /v1/models/NAME:predict; GET /v1/models, /health, /metrics and a chat page at /.

    Args:
        run_dir: the run.
        host, port: the address to bind (loopback by default; `port=0`: any free port).
        api_key: require `Authorization: Bearer KEY` (None: no key; the command's
            default is `$DEEPSEEK_TF_API_KEY`).
        warm_up: compile the serving shapes before `/health` reports ready (False: ready
            at once, the first requests compile).
        model_name: the served model id (None: the run directory's name).
        max_batch: most requests decoded at once; `no_batching`: one at a time.
        batching: "continuous" (requests join and leave between decode steps) or
            "dynamic" (a batch runs to its end; `batch_window_ms`, `chunk`).
        step_ms, stream_interval, prefix_cache_mb: continuous batching: target time of
            one decode call, most tokens per call while a request streams, prefix cache
            (0: off).
        request_timeout: seconds a generation may take (None: no limit).
        speculative, draft_tokens: "mtp": speculative decoding with the model's MTP
            modules, `draft_tokens` drafts per round (runs with dynamic batching).
        max_model_len: positions a prompt and its reply may take (None: the checkpoint's
            context, lowered to what the cache budget holds; longer requests get 400).
        kv_cache_memory: the decoding cache's budget, "4GiB", "512MiB" or bytes (None: a
            quarter of the memory available at start-up). `Served.app.cache_plan` says
            what was chosen.
        max_tokens, max_prompt_tokens: request limits (None: `max_model_len`).
        max_body_bytes, max_queue, max_connections: beyond these a request gets 413,
            429, 503.
        lora: LoRA runs served beside this one, "NAME=RUN_DIR" strings or `{NAME:
            RUN_DIR}` (`serving.lora_adapters`): a request's `model` picks one by name;
            each must be trained (`train.lora_rank`) from this run's weights.
        block: serve until interrupted, then close (as the command does).

    Returns:
        The running `Served` (closed already when `block`).

    Raises:
        InputError: an option out of range, an address that cannot be bound, an adapter
            that is not a LoRA run of this model.
    """
    check_port(port)  # before the (slow) model load
    if kv_cache_memory is not None:
        parse_size(kv_cache_memory)
    specs = parse_lora(lora)
    run = RunDir(run_dir)
    config = serving_config(run.require().read_config(), specs)
    check_fits(config, purpose="inference")
    model, tokenizer = run.load(config)
    adapters = load_adapters(specs, model)
    app = ServingApp(
        model, tokenizer, model_name or Path(run_dir).resolve().name, api_key=api_key,
        max_batch=1 if no_batching else max_batch, batching=batching, step_ms=step_ms,
        stream_interval=stream_interval, prefix_cache_mb=prefix_cache_mb,
        request_timeout=request_timeout, speculative=speculative, draft_tokens=draft_tokens,
        window_s=batch_window_ms / 1000, chunk=chunk, max_tokens=max_tokens,
        max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
        max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
        max_queue=max_queue, max_connections=max_connections, warm_up=warm_up,
        adapters=adapters,
    )  # fmt: skip
    server = make_server(app, host, port)
    served = Served(app, server, f"http://{host}:{server.server_port}")
    if block:
        served.join()
    return served
