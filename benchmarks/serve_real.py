"""Serving the 1.46B demonstration: short chats to `deepseek-tf serve` with 16 slots and 1.

The checkpoint is `decode_real.py`'s (`real_checkpoint.py`'s structure: DeepSeek-V2-Lite
at hidden 1024 and 12 layers, 1.46B parameters in bf16, converted with `convert
--from-hf`; made once in `--keep` and reused). Each server is started with default flags
but `--max-batch` (16, the default, and 1), in its own process on 127.0.0.1. Once
`/health` answers: one chat of `--max-tokens` greedy tokens (untimed), then `--chats`
chats one after the other, then `--chats` at once. Reported: seconds to ready, the
sequential chats' latency (median) and their tokens/s, the concurrent chats' wall time.
The 1-slot server is what a 16-slot one would be if idle slots cost nothing: a decode
call runs every slot, so each idle one is routed through the experts and read from the
cache unless the server skips it. This compares two settings of deepseek-tf, not a peer.

    python benchmarks/serve_real.py --keep /tmp/rq     # ~5 min once the checkpoint exists
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_common as bc
from real_checkpoint import CLI, healthy, make_checkpoint, measured

NAME = "serve_real"


def chat(url: str, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": tokens,
            "temperature": 0}  # fmt: skip
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    began = time.perf_counter()
    reply = json.loads(urllib.request.urlopen(request, timeout=600).read())
    return {"s": time.perf_counter() - began, "tokens": reply["usage"]["completion_tokens"]}


def serve(run: Path, slots: int, port: int, args) -> dict:
    """Starts the server, times its chats, stops it."""
    began = time.perf_counter()
    cmd = [*CLI, "serve", str(run), "--port", str(port), "--max-batch", str(slots)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        if not healthy(server, url, began):
            return {"error": "the server did not start"}
        ready = time.perf_counter() - began
        chat(url, args.max_tokens)  # the prefix cache now holds the prompt, as later
        alone = [chat(url, args.max_tokens) for _ in range(args.chats)]
        began = time.perf_counter()
        with ThreadPoolExecutor(args.chats) as pool:
            together = list(pool.map(lambda _: chat(url, args.max_tokens), range(args.chats)))
        wall = time.perf_counter() - began
        latency = bc.median([c["s"] for c in alone])
        return {"slots": slots, "ready_s": ready, "alone_s": [c["s"] for c in alone],
                "alone_median_s": latency, "alone_tok_s": args.max_tokens / latency,
                "together_s": wall,
                "together_tokens": sum(c["tokens"] for c in together)}  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="a directory for the checkpoint (reused if there)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--chats", type=int, default=4)
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--out", default=bc.default_out(NAME))
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-serve-real-"))
    hf, run = work / "hf", work / "auto_run"
    if not (hf / "config.json").is_file():
        make_checkpoint(hf, 12, 1024, 512, 384)  # decode_real.py's (q-LoRA rank 384)
    if not (run / "config.yaml").is_file():
        assert measured([*CLI, "convert", "--from-hf", hf, "--out", run])["code"] == 0
    info = bc.machine_info(("tensorflow", "keras"))
    rows = []
    for i, slots in enumerate((16, 1)):
        quiet = bc.maybe_wait_quiet(f"{slots} slots", args.wait_quiet)
        print(f"[serve] --max-batch {slots}", flush=True)
        rows.append({**serve(run, slots, args.port + i, args), "quiet": quiet})
    bc.print_machine(info)
    bc.print_table(["slots", "ready", "chat (median)", "chat tok/s", f"{args.chats} at once"], [
        [str(r["slots"]), f"{bc.fmt(r.get('ready_s'), '.0f')} s",
         f"{bc.fmt(r.get('alone_median_s'), '.2f')} s", bc.fmt(r.get("alone_tok_s"), ".2f"),
         f"{bc.fmt(r.get('together_s'), '.2f')} s"] for r in rows])  # fmt: skip
    ratio = bc.ratio(rows[0].get("alone_median_s"), rows[1].get("alone_median_s"))
    print(f"a chat with 16 slots takes {bc.fmt(ratio, '.2f')}x its time with 1 slot")
    result = {"benchmark": NAME, "machine": info, "settings": vars(args), "rows": rows,
              "slots_16_over_1": ratio}  # fmt: skip
    print(f"result -> {bc.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
