"""HTTP serving under load: `deepseek-tf serve`'s dynamic batching on against off.

The server runs in a child process on 127.0.0.1 (a free port) with the
shakespeare-char model shape (4 layers, width 128, vocabulary 65, context 128)
and random weights, no tokenizer (token-id prompts). Its decoder is warmed up
for every batch size first (XLA compilation is not timed). Then `--concurrency`
client threads send `--requests` streaming `/v1/completions` requests in all,
each a random 16-31 token prompt and `--max-new-tokens` greedy new tokens (no
stop token, so every request generates them all). Reported: requests/s,
generated tokens/s, p50/p99 latency (request to `[DONE]`) and time to first
token (request to the first chunk carrying text), failed requests. The same
load runs again against a server started with `--no-batching`; the ratio is
batched over unbatched.

Usage:
    python benchmarks/serve_load.py                       # 16 clients, 200 requests x 64
    python benchmarks/serve_load.py --requests 48 --max-new-tokens 32   # quicker
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import subprocess
import sys
import threading
import time

import bench_common as bc

NAME = "serve_load"
PRESET = "shakespeare-char"
VOCAB = 65
MAX_SEQ_LEN = 128


def serve_child(args) -> None:
    """The server process: build the model, warm the decoder up, serve."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.generation.decoding import Row
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.serving.server import ServingApp, make_server

    cfg = load_config(PRESET, overrides=[f"model.max_seq_len={MAX_SEQ_LEN}"])
    model = build_model(cfg, vocab_size=VOCAB, seed=0)
    app = ServingApp(model, None, "bench", max_batch=args.max_batch, chunk=args.chunk)
    size = 1
    while size <= args.max_batch:  # compile every batch bucket the load can produce
        state = app.batcher.decoder.start([Row(list(range(1, 17)), args.max_new_tokens)] * size)
        while not state.finished:
            state.step()
        size *= 2
    server = make_server(app, "127.0.0.1", 0)
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


def one_request(port: int, prompt: list[int], max_new: int) -> dict:
    body = json.dumps(
        {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": max_new,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    start = time.perf_counter()
    first = None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"ok": False, "status": resp.status}
        tokens, done = 0, False
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            text = chunk["choices"][0]["text"] if chunk["choices"] else ""
            if text and first is None:
                first = time.perf_counter() - start
            tokens += len(text.split())  # no tokenizer: the text is " id id ..."
        return {
            "ok": done and tokens == max_new,
            "latency": time.perf_counter() - start,
            "ttft": first,
            "tokens": tokens,
        }
    except OSError as e:
        return {"ok": False, "error": repr(e)}
    finally:
        conn.close()


def run_load(args, batching: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--serve-child",
        "--chunk",
        str(args.chunk),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--max-batch",
        str(args.concurrency if batching else 1),
    ]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        port = None
        for line in child.stdout:
            if line.startswith("PORT "):
                port = int(line.split()[1])
                break
        if port is None:
            raise RuntimeError("the server child exited before serving")
        rng = random.Random(0)
        prompts = [
            [rng.randrange(VOCAB) for _ in range(rng.randrange(16, 32))]
            for _ in range(args.requests)
        ]
        results, lock, cursor = [], threading.Lock(), iter(prompts)

        def client():
            while True:
                with lock:
                    prompt = next(cursor, None)
                if prompt is None:
                    return
                r = one_request(port, prompt, args.max_new_tokens)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        child.terminate()
        child.wait(timeout=30)
    ok = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {
        "batching": batching,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_p50_s": pct(lat, 0.5),
        "latency_p99_s": pct(lat, 0.99),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "failures": [r for r in results if not r["ok"]][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="server tokens per decode chunk")
    parser.add_argument("--max-batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-unbatched", action="store_true")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args)
    if args.max_new_tokens + 31 > MAX_SEQ_LEN:
        parser.error(f"--max-new-tokens must be <= {MAX_SEQ_LEN - 31}")
    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras"]),
        "settings": {
            k: getattr(args, k) for k in ("requests", "concurrency", "max_new_tokens", "chunk")
        },
        "runs": [run_load(args, batching=True)],
    }
    if not args.skip_unbatched:
        result["runs"].append(run_load(args, batching=False))
        on, off = result["runs"]
        result["throughput_ratio"] = bc.ratio(on["tokens_per_s"], off["tokens_per_s"])
    rows = [
        [
            "batching" if r["batching"] else "no batching",
            str(r["requests"]),
            str(r["failed"]),
            bc.fmt(r["requests_per_s"], ".2f"),
            bc.fmt(r["tokens_per_s"], ".0f"),
            bc.fmt(r["latency_p50_s"], ".2f"),
            bc.fmt(r["latency_p99_s"], ".2f"),
            bc.fmt(r["ttft_p50_s"], ".3f"),
            bc.fmt(r["ttft_p99_s"], ".3f"),
        ]
        for r in result["runs"]
    ]
    bc.print_table(
        ["", "requests", "failed", "req/s", "tok/s", "p50 s", "p99 s", "ttft p50", "ttft p99"],
        rows,
    )
    if "throughput_ratio" in result:
        print(f"batched / unbatched throughput: {bc.fmt(result['throughput_ratio'], '.2f')}x")
    print(f"wrote {bc.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
