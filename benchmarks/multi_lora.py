"""Several LoRA adapters served beside one base: throughput against the merged model.

Each server runs in a child process on 127.0.0.1 with `serve_load.py`'s model
(the shakespeare-char shape, vocabulary 65, context 128, random weights, token-id
prompts) and continuous batching, 16 slots. The adapters are random rank-8 LoRA factors
on every attention and feed-forward projection (what `train.lora_rank=8
train.lora_targets=[attention,ffn]` trains), built in the child; the same factors are
used everywhere, so "merged" is adapter 1 folded into the base's kernels and served
without adapters (what `convert --to-hf` of that LoRA run would serve).

For k = 1, 2 and 4 adapters, 16 closed-loop clients send `--requests` requests (random
16-31 token prompts, `--max-new-tokens` greedy tokens, streamed), request i naming
adapter i mod k, so rows of every adapter share each batch. Reported: generated
tokens/s, and its ratio to the merged model's (issue 25's goal: >= 0.7x). Before each
timed load the script waits for the machine (and the compiled, idle server) to be quiet;
the server is a child process, so the load is the only other work while it runs.

Usage:
    python benchmarks/multi_lora.py --wait-quiet 120     # ~4 min on 2 cores

No peer: this compares deepseek-tf's adapters with its own merged model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading

import bench_common as bc
import serve_load as sl

NAME = "multi_lora"
RANK = 8
COUNTS = (1, 2, 4)


def serve_child(args) -> None:
    """The server process: base + `args.adapters` adapters (0: adapter 1 merged)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from deepseek_tf.config.loader import load_config
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.models.multi_lora import Adapter, dense_layers
    from deepseek_tf.serving.server import ServingApp, make_server

    cfg = load_config(sl.PRESET, overrides=[f"model.max_seq_len={sl.MAX_SEQ_LEN}"])
    model = build_model(cfg, vocab_size=sl.VOCAB, seed=0)
    layers = dense_layers(model)
    rng = np.random.default_rng(0)
    adapters = []
    for i in range(max(args.adapters, 1)):
        factors = {}
        for key, layer in layers.items():
            d_in, d_out = (int(d) for d in layer._kernel.shape)
            a = rng.normal(0, d_in**-0.5, (d_in, RANK)).astype(np.float32)
            factors[key] = (a, rng.normal(0, 0.02, (RANK, d_out)).astype(np.float32))
        adapters.append(Adapter(f"a{i}", factors))
    if args.adapters == 0:  # the merged model: adapter a0 folded into the kernels
        for key, layer in layers.items():
            a, b = adapters[0].factors[key]
            layer._kernel.assign(layer._kernel.numpy() + a @ b)
        adapters = []
    app = ServingApp(model, None, "bench", max_batch=sl.CLIENTS, adapters=adapters)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app.batcher.ready.wait()
    print(f"PORT {server.server_port}", flush=True)
    threading.Event().wait()


class Child:
    """A server child process (context manager) with `adapters` adapters."""

    def __init__(self, adapters: int):
        cmd = [sys.executable, __file__, "--serve-child", "--adapters", str(adapters)]
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.port = next((int(x.split()[1]) for x in self.child.stdout if x.startswith("PORT")), 0)
        if not self.port:
            raise RuntimeError("the server child exited before serving")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.child.terminate()
        self.child.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args)
    result = {"benchmark": NAME, "machine": bc.machine_info(["tensorflow", "keras"]),
              "settings": {"requests": args.requests, "max_new_tokens": args.max_new_tokens,
                           "clients": sl.CLIENTS, "rank": RANK}, "runs": {}}  # fmt: skip
    setups = {"merged": 0, **{f"{k} adapters": k for k in COUNTS}}
    for label, k in setups.items():
        with Child(k) as server:
            models = ("bench",) if k == 0 else tuple(f"a{i}" for i in range(k))
            sl.one_request(server.port, list(range(1, 17)), 8, model=models[0])  # warm
            quiet = bc.maybe_wait_quiet(NAME, args.wait_quiet)  # the server idle, compiled
            run = sl.run_load(server.port, args, None, models=models)
            result["runs"][label] = {**run, "quiet_before": quiet}
        print(f"[{label}] {run['tokens_per_s']:.0f} tok/s, {run['failed']} failed", flush=True)
    merged = result["runs"]["merged"]["tokens_per_s"]
    rows = []
    for label, run in result["runs"].items():
        ratio = bc.ratio(run["tokens_per_s"], merged)
        result["runs"][label]["vs_merged"] = ratio
        rows.append([label, str(run["failed"]), f"{run['tokens_per_s']:.0f}",
                     bc.fmt(ratio, ".2f"), bc.fmt(run["ttft_p50_s"], ".3f")])  # fmt: skip
    bc.print_table(["server", "failed", "tok/s", "x merged", "TTFT p50"], rows)
    print(f"wrote {bc.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
