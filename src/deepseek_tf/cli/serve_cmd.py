"""`deepseek-tf serve RUN_DIR`: an OpenAI-compatible HTTP server over a trained run."""

from __future__ import annotations

import os


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a run over HTTP (OpenAI completions/chat, TF-Serving predict)",
        description="Serves RUN_DIR: POST /v1/completions, /v1/chat/completions, "
        "/v1/models/NAME:predict; GET /v1/models, /health. Binds 127.0.0.1 by default.",
    )
    parser.add_argument("run_dir")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DEEPSEEK_TF_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $DEEPSEEK_TF_API_KEY, else none)",
    )
    parser.add_argument("--model-name", help="the served model id (default: the run's name)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests per batch")
    parser.add_argument("--no-batching", action="store_true", help="decode one request at a time")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--chunk", type=int, default=8, help="tokens decoded between checks")
    parser.add_argument("--max-tokens", type=int, help="largest max_tokens (default: context)")
    parser.add_argument("--max-prompt-tokens", type=int, help="default: the context")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests beyond this get 429"
    )
    parser.add_argument(
        "--max-connections", type=int, default=256, help="open connections beyond this get 503"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    import logging
    from pathlib import Path

    from deepseek_tf.api import load
    from deepseek_tf.errors import InputError
    from deepseek_tf.serving.server import ServingApp, make_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not 0 <= args.port <= 65535:  # before the (slow) model load
        raise InputError(f"--port: must be in 0-65535 (0: any free port), got {args.port}")
    model, tokenizer = load(args.run_dir)
    app = ServingApp(
        model,
        tokenizer,
        args.model_name or Path(args.run_dir).resolve().name,
        api_key=args.api_key,
        max_batch=1 if args.no_batching else args.max_batch,
        window_s=args.batch_window_ms / 1000,
        chunk=args.chunk,
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
        max_connections=args.max_connections,
    )
    server = make_server(app, args.host, args.port)
    print(f"serving {app.model_name} on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.batcher.stop()
    return 0
