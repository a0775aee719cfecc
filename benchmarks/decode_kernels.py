"""Batch-1 decoding's kernels: weight bytes read per second by each weight dtype.

Decoding one token multiplies a (1, d) vector by every active weight matrix, so its speed
is set by how fast a matrix-vector product streams weights from memory. This script
times that product at the shapes of the 1.46B V2-Lite-structured demonstration
(`real_checkpoint.py`: a routed expert's 1024 x 512, a 1024 x 2048 projection, the
1024 x 102,400 output head) for each weight dtype deepseek-tf can hold -- float32,
bfloat16, and Keras' int8 (int8 codes times a per-column scale) -- compiled with XLA as
the decode loop is, and beside them the same products in PyTorch (its CPU bfloat16 and
float32 kernels, a peer in the same invocation, in a subprocess), plus this machine's
read bandwidth (numpy summing 1 GiB, one thread per core). A kernel's "fraction of
bandwidth" is its weight bytes per second over that figure. Last, one token's routed
experts (6 of 64 per stack) picked three ways (`expert_pick_rows`).

    python benchmarks/decode_kernels.py              # ~2 min on 2 cores
    python benchmarks/decode_kernels.py --skip-peer  # deepseek-tf's kernels only
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time

import numpy as np
from bench_common import (
    add_wait_quiet_arg,
    default_out,
    machine_info,
    maybe_wait_quiet,
    print_machine,
    print_table,
    write_json,
)

SHAPES = {  # name: (in, out, matrices timed together)
    "expert 1024x512": (1024, 512, 64),
    "proj 1024x2048": (1024, 2048, 16),
    "head 1024x102400": (1024, 102400, 1),
}
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def timed(fn, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` calls after one warm-up call."""
    np.asarray(fn())
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        np.asarray(fn())
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def read_bandwidth(threads: int) -> float:
    """Bytes per second `threads` numpy sums (which release the GIL) read from a 1 GiB
    float32 array split between them (median of 5)."""
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(np.ones(2**28, np.float32), threads)
    with ThreadPoolExecutor(threads) as pool:
        seconds = timed(lambda: sum(pool.map(np.sum, parts)), 5)
    return 2**30 / seconds


def tensorflow_rows(repeat: int) -> list[dict]:
    import tensorflow as tf

    rows = []
    for name, (d, h, n) in SHAPES.items():
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal((1, d)), tf.float32)
        w32 = [tf.Variable(rng.standard_normal((d, h)).astype(np.float32)) for _ in range(n)]
        weights = {
            "float32": (w32, lambda w, x: tf.matmul(x, w)),
            "bfloat16": (
                [tf.Variable(tf.cast(w, tf.bfloat16)) for w in w32],
                lambda w, x: tf.cast(tf.matmul(tf.cast(x, tf.bfloat16), w), tf.float32),
            ),
            # the same bf16 weights stored (out, in): the product contracts their minor
            # axis, which XLA's CPU matrix-vector emitter reads at the bandwidth, while
            # (in, out) -- Keras' kernel layout -- goes through an element-wise convert
            "bfloat16 (out, in)": (
                [tf.Variable(tf.transpose(tf.cast(w, tf.bfloat16))) for w in w32],
                lambda w, x: tf.einsum("bk,nk->bn", x, tf.cast(w, tf.float32)),
            ),
            "int8": (
                [
                    (
                        tf.Variable(tf.cast(tf.clip_by_value(w * 40, -127, 127), tf.int8)),
                        tf.Variable(tf.ones((h,)) / 40),
                    )
                    for w in w32
                ],  # fmt: skip
                lambda w, x: tf.matmul(x, tf.cast(w[0], tf.float32)) * w[1],
            ),
        }
        for dtype, (ws, product) in weights.items():

            def run(x, ws=ws, product=product):
                return tf.add_n([product(w, x) for w in ws])

            fn = tf.function(run, jit_compile=True)
            seconds = timed(lambda fn=fn, x=x: fn(x), repeat)
            rows.append(_row("deepseek-tf (TF XLA)", name, dtype, d * h * n, seconds))
        del weights, w32
    return rows


def expert_pick_rows(repeat: int, layers: int = 4) -> list[dict]:
    """One decoded token's routed experts: 6 of a `(64, 1024, 512)` stack per projection
    (gate, up, down; `layers` stacks of each, 1.6 GB in all): XLA gathering the 6 as the
    decode step does, XLA reading 6 experts held as their own `(6, 1024, 512)` variable
    (no selection: the floor), and a TensorFlow graph without XLA slicing each expert
    out of the stack (a slice of a stack's leading axis shares its buffer)."""
    import tensorflow as tf

    e, d, h, k = 64, 1024, 512, 6
    rng = np.random.default_rng(0)
    stacks = [tf.Variable(rng.standard_normal((e, d, h), np.float32)) for _ in range(3 * layers)]
    own = [tf.Variable(s[:k]) for s in stacks]  # (6, d, h)
    x = tf.constant(rng.standard_normal((1, d)), tf.float32)
    picks = [tf.constant(rng.choice(e, k, replace=False), tf.int32) for _ in range(8)]

    def batched(x, ws):  # (k, 1, d) x (k, d, h) per stack
        xs = tf.broadcast_to(x[None], (k, 1, d))
        return tf.add_n([tf.reduce_sum(tf.matmul(xs, w)) for w in ws])

    def sliced(x, idx):
        return tf.add_n([tf.reduce_sum(tf.matmul(x, w[idx[j]])) for w in stacks for j in range(k)])

    def gathered(x, idx):
        return batched(x, [tf.gather(w, idx) for w in stacks])  # (k, d, h) copies

    variants = {
        "XLA: gather 6 of 64": tf.function(gathered, jit_compile=True),
        "XLA: 6 own (no pick)": tf.function(lambda x, idx: batched(x, own), jit_compile=True),
        "TF graph: slice 6 of 64": tf.function(sliced),
    }
    rows = []
    for name, fn in variants.items():
        pick = itertools.cycle(picks)  # a different pick each call (never a constant)
        seconds = timed(lambda fn=fn, pick=pick: fn(x, next(pick)), repeat)
        shape = f"6 of 64 experts 1024x512 (x{3 * layers})"
        rows.append(
            _row(f"deepseek-tf ({name})", shape, "float32", 3 * layers * k * d * h, seconds)
        )
    return rows


PEER = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
shapes, repeat, rows = json.loads(sys.argv[1]), int(sys.argv[3]), []
for name, (d, h, n) in shapes.items():
    for dtype in ("float32", "bfloat16"):
        t = getattr(torch, dtype)
        ws = [torch.randn(h, d).to(t) for _ in range(n)]
        x = torch.randn(1, d).to(t)
        def run():
            with torch.inference_mode():
                return sum(torch.nn.functional.linear(x, w).float() for w in ws)
        run(); times = []
        for _ in range(repeat):
            began = time.perf_counter(); run(); times.append(time.perf_counter() - began)
        rows.append([name, dtype, d * h * n, float(np.median(times))])
print(json.dumps(rows))
"""


def torch_rows(repeat: int, threads: int) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-c", PEER, json.dumps(SHAPES), str(threads), str(repeat)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [_row("PyTorch", *row) for row in json.loads(out.strip().splitlines()[-1])]


def _row(framework: str, shape: str, dtype: str, params: int, seconds: float) -> dict:
    return {"framework": framework, "shape": shape, "dtype": dtype, "params": params,
            "seconds": seconds, "gparams_per_s": params / seconds / 1e9,
            "weight_gb_per_s": params * BYTES[dtype.split()[0]] / seconds / 1e9}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--out", default=default_out("decode_kernels"))
    add_wait_quiet_arg(parser)
    args = parser.parse_args()
    quiet = maybe_wait_quiet("decode_kernels", args.wait_quiet)
    info = machine_info(["tensorflow", "torch", "numpy"])
    bandwidth = read_bandwidth(info.get("cores", 2))
    rows = tensorflow_rows(args.repeat) + expert_pick_rows(args.repeat)
    if not args.skip_peer:
        rows += torch_rows(args.repeat, info.get("cores", 2))
    for row in rows:
        row["fraction_of_bandwidth"] = row["weight_gb_per_s"] * 1e9 / bandwidth
    print_machine(info)
    print(f"read bandwidth (numpy sums of 1 GiB, one thread per core): {bandwidth / 1e9:.1f} GB/s")
    print_table(
        ["framework", "shape", "weights", "ms", "Gparam/s", "weight GB/s", "of bandwidth"],
        [[r["framework"], r["shape"], r["dtype"], f"{r['seconds'] * 1e3:.2f}",
          f"{r['gparams_per_s']:.2f}", f"{r['weight_gb_per_s']:.1f}",
          f"{r['fraction_of_bandwidth']:.2f}"] for r in rows],
    )  # fmt: skip
    path = write_json(args.out, {"machine": info, "quiet": quiet,
                                 "read_bandwidth": bandwidth, "rows": rows})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
