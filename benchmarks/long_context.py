"""Long contexts: training-step speed and peak memory from 1k to 32k tokens, plain vs
blocked attention, RoPE vs the brief's dynamic attention, and PyTorch's attention beside.

Two tables, every measurement in its own process (so its peak memory is its own; a
variant that runs out of memory under the `--memory-gib` address-space limit is reported
as such, not retried):

- **Model rows**: one training step (forward + backward + AdamW, deepseek-tf's own
  compiled step, `memory.py`'s worker) of the `shakespeare-char` model's shape (4 layers
  of width 128, 4 heads of 32, SwiGLU 352), batch 1, at each length T, for: RoPE, dynamic
  attention, RoPE+dynamic and MLA, each with the plain attention (`(B, H, T, T)` scores)
  and the blocked one (`model.attention_blocked_above=1`: every call blocked). Tokens/s
  (median of the timed steps) and peak RSS.
- **Kernel rows**: causal attention alone at `(1, T, 4, 32)`, forward + backward:
  deepseek-tf's plain and blocked paths (XLA-compiled) and PyTorch's
  `scaled_dot_product_attention` (the peer, in the same invocation, one after the other).

    python benchmarks/long_context.py                          # ~30 min on 2 cores
    python benchmarks/long_context.py --lengths 256,1024 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from types import SimpleNamespace

from bench_common import (
    add_wait_quiet_arg,
    default_out,
    machine_info,
    maybe_wait_quiet,
    print_machine,
    print_table,
    write_json,
)
from memory import run_variant

POSITIONS = {
    "RoPE": ["model.position=rope"],
    "dynamic": ["model.position=dynamic", "model.bias_max_distance=4096"],
    "RoPE+dynamic": ["model.position=rope+dynamic", "model.bias_max_distance=4096"],
    "MLA": [
        "model.attention=mla", "model.kv_lora_rank=64", "model.q_lora_rank=0",
        "model.qk_nope_head_dim=24", "model.qk_rope_head_dim=8", "model.v_head_dim=32",
    ],
}  # fmt: skip
PATHS = {
    "plain": ["model.attention_blocked_above=0"],
    "blocked": ["model.attention_blocked_above=1"],
}

KERNEL = r"""
import json, os, resource, statistics, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
args = json.loads(sys.argv[1])
t, heads, dim, steps = args["t"], 4, 32, args["steps"]
if args["side"] == "torch":
    import torch
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, t, dim, requires_grad=True) for _ in range(3))
    def run():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
else:
    import tensorflow as tf
    from deepseek_tf.layers.attention import causal_attention
    from deepseek_tf.layers.blocked_attention import blocked_attention
    q, k, v = (tf.Variable(tf.random.normal((1, t, heads, dim), seed=i)) for i in range(3))
    pos = tf.range(t)
    def attention(q, k, v):
        if args["side"] == "blocked":
            return blocked_attention(q, k, v, pos, pos, dim**-0.5, block_size=args["block"])
        return causal_attention(q, k, v, pos, pos, dim**-0.5)
    @tf.function(jit_compile=True)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(attention(q, k, v))
        return tape.gradient(loss, [q, k, v])
    run = lambda: [g.numpy() for g in step()]
run()  # warm-up (compiles)
times = []
for _ in range(steps):
    began = time.perf_counter()
    run()
    times.append(time.perf_counter() - began)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"step_s": statistics.median(times), "peak_mib": peak}))
"""


def kernel_row(side: str, t: int, args) -> dict:
    steps = max(args.steps, 2**16 // t)  # short lengths: enough steps for a steady median
    payload = {"side": side, "t": t, "steps": steps, "block": args.block}
    done = subprocess.run(
        [sys.executable, "-c", KERNEL, json.dumps(payload)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": _failure(done.stderr)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = t / result["step_s"]
    return result


def model_row(overrides: list[str], t: int, args) -> dict:
    steps = max(args.steps, 2**14 // t)  # short lengths: enough steps for a steady median
    shape = SimpleNamespace(layers=4, d_model=128, seq_len=t, batch=1, steps=steps)
    sizes = ["model.n_heads=4", "model.ffn_dim=352", f"model.attention_block_size={args.block}"]
    try:
        return run_variant([*sizes, *overrides], shape)
    except subprocess.CalledProcessError as e:
        return {"error": _failure(e.stderr or "")}


def _failure(stderr: str) -> str:
    """What stopped a measurement, in a few words."""
    if "ResourceExhausted" in stderr or "MemoryError" in stderr or "bad_alloc" in stderr:
        return "out of memory"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:80] if lines else "killed"


def _cell(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_mib']:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384,32768")
    parser.add_argument(
        "--steps", type=int, default=1, help="timed steps after the first (at least 16k tokens)"
    )
    parser.add_argument("--block", type=int, default=512, help="model.attention_block_size")
    parser.add_argument("--memory-gib", type=float, default=20.0, help="per-process limit")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-kernel", action="store_true", help="the model rows only")
    parser.add_argument(
        "--positions", default=",".join(POSITIONS), help="model rows, comma-separated"
    )
    parser.add_argument("--out", default=default_out("long_context"))
    add_wait_quiet_arg(parser)
    args = parser.parse_args()
    limit = int(args.memory_gib * 2**30)  # inherited by every measurement's process
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    lengths = [int(x) for x in args.lengths.split(",")]
    positions = args.positions.split(",")
    unknown = sorted(set(positions) - set(POSITIONS))
    if unknown:
        parser.error(f"--positions: unknown {', '.join(unknown)} (known: {', '.join(POSITIONS)})")
    results = {"machine": machine_info(["tensorflow", "keras", "torch"]), "args": vars(args)}
    print_machine(results["machine"])
    results["quiet"] = maybe_wait_quiet("long_context", args.wait_quiet)
    sides = [] if args.skip_kernel else ["plain", "blocked"] + ([] if args.skip_peer else ["torch"])
    results["kernel"] = {f"{s} T={t}": kernel_row(s, t, args) for t in lengths for s in sides}
    print_table(
        ["attention alone, fwd+bwd", *map(str, lengths)],
        [[s, *(_cell(results["kernel"][f"{s} T={t}"]) for t in lengths)] for s in sides],
    )
    models = {}
    for name in positions:
        for path, switch in PATHS.items():
            for t in lengths:
                models[f"{name}, {path}, T={t}"] = model_row([*POSITIONS[name], *switch], t, args)
    results["model"] = models
    rows = [
        [f"{name}, {path}", *(_cell(models[f"{name}, {path}, T={t}"]) for t in lengths)]
        for name in positions
        for path in PATHS
    ]
    print_table(["training step, batch 1", *map(str, lengths)], rows)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
