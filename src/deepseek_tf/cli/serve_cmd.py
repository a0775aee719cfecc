"""`deepseek-tf serve RUN_DIR`: an OpenAI-compatible HTTP server over a trained run
(`deepseek_tf.api.deployment.serve`)."""

from __future__ import annotations

import os


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a run over HTTP (OpenAI completions/chat, TF-Serving predict)",
        description="Serves RUN_DIR: POST /v1/completions, /v1/chat/completions, "
        "/v1/models/NAME:predict; GET /v1/models, /health, /metrics and a chat page at /. "
        "Binds 127.0.0.1 by default. Requests join the running batch between decode steps "
        "(continuous batching); /health answers 503 until the shapes are compiled.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DEEPSEEK_TF_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $DEEPSEEK_TF_API_KEY, else none)",
    )
    parser.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="report ready at once and compile each shape on first use (slow first requests)",
    )
    parser.add_argument("--model-name", help="the served model id (default: the run's name)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests decoded at once")
    parser.add_argument("--no-batching", action="store_true", help="decode one request at a time")
    parser.add_argument(
        "--batching",
        choices=("continuous", "dynamic"),
        default="continuous",
        help="continuous: requests join and leave between steps; dynamic: a batch runs to "
        "its end (the older scheduler, kept for comparison)",
    )
    parser.add_argument(
        "--step-ms", type=float, default=50.0, help="continuous: target time of one decode call"
    )
    parser.add_argument(
        "--stream-interval", type=int, default=16, help="continuous: most tokens per call "
        "while a request streams (a call lasts about --step-ms, so streams see tokens that "
        "often; 1: every token as it is decoded, at some throughput)",
    )  # fmt: skip
    parser.add_argument(
        "--prefix-cache-mb", type=float, default=256, help="continuous: prefix cache (0: off)"
    )
    parser.add_argument(
        "--request-timeout", type=float, help="seconds a generation may take (default: no limit)"
    )
    parser.add_argument(
        "--speculative", choices=("mtp",), help="speculative decoding: the model's MTP modules "
        "draft tokens one model pass verifies (runs with dynamic batching)",
    )  # fmt: skip
    parser.add_argument("--draft-tokens", type=int, help="with --speculative: drafts per round")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="dynamic batching")
    parser.add_argument("--chunk", type=int, default=8, help="dynamic: tokens between checks")
    parser.add_argument(
        "--max-model-len", type=int, help="positions a prompt and its reply may take "
        "(default: the checkpoint's context, lowered to what --kv-cache-memory holds)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-cache-memory", help="the decoding cache's budget, e.g. 4GiB or 512MiB "
        "(default: a quarter of the memory available at start-up)",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, help="largest max_tokens (default: context)")
    parser.add_argument("--max-prompt-tokens", type=int, help="default: the context")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests beyond this get 429"
    )
    parser.add_argument(
        "--max-connections", type=int, default=256, help="open connections beyond this get 503"
    )
    parser.add_argument(
        "--lora",
        action="append",
        metavar="NAME=RUN_DIR",
        help="serve a LoRA run (trained with train.lora_rank from this run) beside it; a "
        "request's model field picks it by NAME (repeatable)",
    )
    parser.set_defaults(func=run, api="deepseek_tf.api.deployment:serve")


OPTIONS = (  # the flags' dests, each a keyword of `deepseek_tf.api.deployment.serve`
    "host", "port", "api_key", "warm_up", "model_name", "max_batch", "no_batching",
    "batching", "step_ms", "stream_interval", "prefix_cache_mb", "request_timeout",
    "speculative", "draft_tokens", "max_model_len", "kv_cache_memory", "batch_window_ms",
    "chunk", "max_tokens", "max_prompt_tokens", "max_body_bytes", "max_queue",
    "max_connections", "lora",
)  # fmt: skip


def run(args) -> int:
    import logging
    import threading
    import time

    from deepseek_tf.api.deployment import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    served = serve(args.run_dir, **{name: getattr(args, name) for name in OPTIONS})
    names = ", ".join((served.app.model_name, *served.app.adapter_names))
    print(f"serving {names} on {served.url}", flush=True)
    print(served.app.cache_plan.describe(), flush=True)
    began = time.perf_counter()

    def announce():
        served.wait_ready(timeout=None)
        seconds = time.perf_counter() - began
        print(f"ready after {seconds:.1f} s (shapes compiled): chat page {served.url}/ ; "
              f"OpenAI clients: base_url='{served.url}/v1'", flush=True)  # fmt: skip

    threading.Thread(target=announce, daemon=True).start()
    served.join()
    return 0
