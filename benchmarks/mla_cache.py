"""Multi-head latent attention: KV-cache size and decode speed, naive vs absorbed.

Two parts:

1. Cache bytes per token per layer (bf16 and fp32) for MHA -- which caches what naive
   MLA caches, `n_heads * (qk_nope + qk_rope + v)` values -- against absorbed MLA, which
   caches `kv_lora_rank + qk_rope` values; at the DeepSeek-V3 shape (128 heads, 512 + 64:
   576 vs 40960 values) and at the small shape of part 2. Pure arithmetic
   (`mla_cache_values_per_token`), no weights are built.
2. Measured decode tokens/s of a small stack -- 4 pre-RMSNorm residual layers of
   `MultiHeadLatentAttention` (d_model 256, 8 heads, q_lora_rank 0, kv_lora_rank 64,
   qk_rope 16, qk_nope 32, v 32), float32 -- with `absorb=False` vs `absorb=True`. As in
   `deepseek_tf.generation`, the decoding loop is one `tf.while_loop` compiled with XLA
   (`tf.function(jit_compile=True)`) that decodes `--steps` tokens against a cache of
   `--lengths` slots (the last `--steps` positions; attention always spans the whole
   buffer, unwritten slots masked, so the cost is that of a full cache). Median of
   `--repeats` timed calls after one compiling call; batch 1 and 8.

Usage:
    python benchmarks/mla_cache.py --wait-quiet 300  # ~1-2 min on a quiet 2-core machine
    python benchmarks/mla_cache.py --lengths 128 --batches 1 --steps 8 --repeats 1  # smoke

Writes benchmarks/results/mla_cache.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import bench_common as bc

NAME = "mla_cache"
DEEPSEEK_V3 = {
    "n_heads": 128,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}
DEEPSEEK_V3_LAYERS = 61
SMALL = {
    "d_model": 256,
    "n_heads": 8,
    "q_lora_rank": 0,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
}
SMALL_LAYERS = 4
BYTES = {"bf16": 2, "fp32": 4}


def cache_sizes(mla_cache_values_per_token) -> list[dict]:
    rows = []
    shapes = (("DeepSeek-V3", DEEPSEEK_V3, DEEPSEEK_V3_LAYERS), ("small", SMALL, SMALL_LAYERS))
    for shape_name, shape, layers in shapes:
        args = {k: shape[k] for k in DEEPSEEK_V3}
        naive = mla_cache_values_per_token(**args, absorb=False)
        absorbed = mla_cache_values_per_token(**args, absorb=True)
        for kind, values in (("MHA / naive MLA", naive), ("absorbed MLA", absorbed)):
            rows.append(
                {
                    "shape": shape_name,
                    "cache": kind,
                    "values_per_token_per_layer": values,
                    **{f"bytes_{d}": values * b for d, b in BYTES.items()},
                    "layers": layers,
                    "bytes_bf16_all_layers": values * BYTES["bf16"] * layers,
                    "reduction": naive / values,
                }
            )
    return rows


def build_stack(absorb: bool, seed: int = 0):
    """`SMALL_LAYERS` pre-norm residual MLA layers and the compiled decoding loop."""
    import keras
    import tensorflow as tf

    from deepseek_tf.layers.mla import MultiHeadLatentAttention
    from deepseek_tf.layers.rms_norm import RMSNorm

    keras.utils.set_random_seed(seed)
    layers = [MultiHeadLatentAttention(**SMALL, absorb=absorb) for _ in range(SMALL_LAYERS)]
    norms = [RMSNorm() for _ in range(SMALL_LAYERS + 1)]
    for sublayer in (*layers, *norms):
        sublayer.build((None, None, SMALL["d_model"]))

    def step(x, caches, index):
        new_caches = []
        for layer, norm, cache in zip(layers, norms[:-1], caches, strict=True):
            out, cache = layer(norm(x), cache=cache, cache_index=index)
            x = x + out  # (B, 1, C)
            new_caches.append(cache)
        return norms[-1](x), new_caches  # the next step's input

    @tf.function(jit_compile=True)
    def decode(x, caches, start, steps):
        def cond(i, x, caches):
            return i < start + steps

        def body(i, x, caches):
            x, caches = step(x, caches, i)
            return i + 1, x, caches

        _, x, caches = tf.while_loop(cond, body, (start, x, caches))
        return x, caches

    return layers, decode


def time_decode(absorb: bool, batch: int, length: int, steps: int, repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf

    layers, decode = build_stack(absorb)
    caches = [layer.init_cache(batch, length) for layer in layers]
    x = tf.constant(np.random.RandomState(1).randn(batch, 1, SMALL["d_model"]), tf.float32)
    start = tf.constant(length - steps, tf.int32)
    n = tf.constant(steps, tf.int32)
    t0 = time.perf_counter()
    out, _ = decode(x, caches, start, n)
    out.numpy()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, _ = decode(x, caches, start, n)
        out.numpy()
        times.append(time.perf_counter() - t0)
    seconds = bc.median(times)
    cache_bytes = sum(int(np.prod(v.shape)) * 4 for c in caches for v in c.values())
    return {
        "path": "absorbed" if absorb else "naive",
        "batch": batch,
        "cache_len": length,
        "steps": steps,
        "seconds": seconds,
        "all_seconds": times,
        "compile_and_first_call_seconds": compile_s,
        "tokens_per_sec": batch * steps / seconds,
        "ms_per_step": 1000.0 * seconds / steps,
        "cache_mib_fp32": cache_bytes / 2**20,
    }


def report(result: dict) -> None:
    bc.print_machine(result["machine"])
    print("\nKV cache per token per layer")
    rows = [
        [
            r["shape"],
            r["cache"],
            f"{r['values_per_token_per_layer']:,}",
            f"{r['bytes_bf16']:,}",
            f"{r['bytes_fp32']:,}",
            f"{r['bytes_bf16_all_layers'] / 2**10:,.1f} KiB ({r['layers']} layers)",
            f"{r['reduction']:.1f}x",
        ]
        for r in result["cache_sizes"]
    ]
    headers = ["shape", "cache", "values", "bytes bf16", "bytes fp32", "bf16, all layers"]
    bc.print_table([*headers, "smaller"], rows)

    print(
        f"\nDecode, {SMALL_LAYERS} x MLA (d_model {SMALL['d_model']}, {SMALL['n_heads']} heads, "
        f"kv_lora_rank {SMALL['kv_lora_rank']}, rope {SMALL['qk_rope_head_dim']}, nope "
        f"{SMALL['qk_nope_head_dim']}, v {SMALL['v_head_dim']}), float32, XLA while_loop"
    )
    rows = []
    for r in result["decode_ratios"]:
        rows.append(
            [
                f"batch {r['batch']}, cache {r['cache_len']}",
                bc.fmt(r["naive_tokens_per_sec"], ",.0f"),
                bc.fmt(r["absorbed_tokens_per_sec"], ",.0f"),
                bc.fmt(r["absorbed_over_naive"], ".2f") + "x",
                bc.fmt(r["naive_cache_mib_fp32"], ".1f"),
                bc.fmt(r["absorbed_cache_mib_fp32"], ".2f"),
                bc.fmt(r["others_cpu_share"], ".0%"),
            ]
        )
    headers = ["", "naive tok/s", "absorbed tok/s", "absorbed/naive"]
    bc.print_table([*headers, "naive cache MiB", "absorbed cache MiB", "others' CPU"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=64, help="tokens decoded per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median)")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args(argv)
    if min(args.lengths) < args.steps or args.steps < 1 or args.repeats < 1:
        parser.error("need 1 <= --steps <= every --lengths and --repeats >= 1")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from deepseek_tf.layers.mla import mla_cache_values_per_token

    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras"]),
        "settings": {
            "model": {**SMALL, "layers": SMALL_LAYERS, "dtype": "float32"},
            "steps": args.steps,
            "repeats": args.repeats,
        },
        "cache_sizes": cache_sizes(mla_cache_values_per_token),
        "decode": [],
        "decode_ratios": [],
    }
    for batch in args.batches:
        for length in args.lengths:
            runs = {}
            quiet = bc.maybe_wait_quiet(f"batch {batch}, cache {length}", args.wait_quiet)
            with bc.CpuMeter() as meter:  # both paths: others' CPU while they ran
                for absorb in (False, True):
                    r = time_decode(absorb, batch, length, args.steps, args.repeats)
                    result["decode"].append(r)
                    runs[r["path"]] = r
                    print(
                        f"{r['path']:>8} batch {batch} cache {length}: "
                        f"{r['tokens_per_sec']:,.0f} tok/s",
                        flush=True,
                    )
            naive, absorbed = runs["naive"], runs["absorbed"]
            result["decode_ratios"].append(
                {
                    "batch": batch,
                    "cache_len": length,
                    "naive_tokens_per_sec": naive["tokens_per_sec"],
                    "absorbed_tokens_per_sec": absorbed["tokens_per_sec"],
                    "absorbed_over_naive": bc.ratio(
                        absorbed["tokens_per_sec"], naive["tokens_per_sec"]
                    ),
                    "naive_cache_mib_fp32": naive["cache_mib_fp32"],
                    "absorbed_cache_mib_fp32": absorbed["cache_mib_fp32"],
                    "quiet": quiet,
                    "others_cpu_share": meter.result["others_cpu_share"],
                }
            )
            note = bc.contention_note(f"batch {batch}, cache {length}", meter.result)
            if note:
                print(note, flush=True)
    path = bc.write_json(args.out, result)
    print()
    report(result)
    print(f"result: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
