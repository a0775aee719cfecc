"""Greedy generation speed: deepseek-tf's KV-cached Generator against keras-hub's Llama.

Both models have random weights and the same shape (4 layers, width 128, 4 heads of
32, SwiGLU 352, RoPE, RMSNorm, tied embeddings, vocabulary 65: 812,288 parameters),
float32, batch 1, a 3-token prompt and 256 new tokens, greedy. Each is warmed up once
(compilation); then rounds of calls are timed, every contender once per round in turn
(never two at a time), so that a slow spell of the shared machine hits all alike; the
median over rounds gives tokens/s.

1. ours: `deepseek_tf.generation.generate.Generator` (prefill + one XLA while-loop).
2. peer: keras-hub's `LlamaCausalLM.generate` with `preprocessor=None` (token-id
   inputs), `stop_token_ids=None`, compiled with `sampler="greedy"`: once as
   `compile()` leaves it (Keras' jit_compile="auto", which turns XLA off on CPU) and
   once with `jit_compile=True`. The headline ratio is against the faster of the two.
3. per-token latency of ours as the sequence grows: one cached decoding step
   (`call_with_cache` on a 512-position cache, XLA-compiled) at several cache
   positions, against recomputing the whole prefix (`model(ids[:, :n])`, XLA-compiled)
   at the same lengths.

Usage:
    python benchmarks/generation.py               # ~2 min on 2 cores
    python benchmarks/generation.py --skip-peer   # deepseek-tf only

keras-hub is a benchmark-only dependency (`pip install -e .[bench]`); without it the
peer is skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import bench_common as bc

NAME = "generation"
PRESET = "shakespeare-char"
VOCAB = 65
N_LAYERS = 4
D_MODEL = 128
N_HEADS = 4
FFN_DIM = 352  # the preset's SwiGLU width; keras-hub's intermediate_dim
MAX_SEQ_LEN = 512
PROMPT = [1, 2, 3]
SPEED_GOAL = 2.0  # ours / keras-hub tokens/s
POSITIONS = (16, 64, 128, 256, 480)


def quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # the full-recompute series retraces once per length
    return tf


def interleaved(calls: dict, rounds: int, block: int = 1) -> dict[str, list[float]]:
    """Times `rounds` rounds; each round visits every function in turn (never two at a
    time), calls it once untimed (so that switching from another compiled program is
    not charged to it) and then `block` times timed. A slow spell of the shared machine
    thus hits every contender alike."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            fn()
            for _ in range(block):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return times


def summarise(times: list[float], new_tokens: int) -> dict:
    med = bc.median(times)
    return {
        "seconds": times,
        "median_seconds": med,
        "tokens_per_sec": new_tokens / med,
        "ms_per_token": 1000 * med / new_tokens,
    }


# --------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------
def build_ours(seed: int = 0):
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.models.builder import build_model

    cfg = load_config(PRESET, overrides=[f"model.max_seq_len={MAX_SEQ_LEN}"])
    m = cfg.model
    shape = (m.n_layers, m.d_model, m.n_heads, m.ffn_dim)
    if shape != (N_LAYERS, D_MODEL, N_HEADS, FFN_DIM):
        sys.exit(f"the {PRESET} preset changed shape {shape}: update this benchmark's peer")
    return build_model(cfg, vocab_size=VOCAB, seed=seed)


def setup_ours(model, new_tokens: int) -> tuple[dict, Callable]:
    """The Generator, warmed up (compiled): (info, timed call)."""
    from deepseek_tf.generation.generate import Generator

    gen = Generator(model)  # jit_compile=True

    def call():
        return gen.generate([PROMPT], max_new_tokens=new_tokens)

    started = time.perf_counter()
    out = call()
    warmup = time.perf_counter() - started
    if len(out[0]) != new_tokens:
        sys.exit(f"[ours] generated {len(out[0])} tokens, expected {new_tokens}")
    info = {
        "api": "Generator(model).generate (jit_compile=True), greedy",
        "params": model.count_params(),
        "warmup_seconds": warmup,
    }
    print(f"[ours] Generator ready (first call {warmup:.1f} s)", flush=True)
    return info, call


def run_ours_latency(model, positions, rounds: int, block: int) -> dict:
    """ms per new token at each position: one cached step vs recomputing the prefix."""
    tf = quiet_tensorflow()

    step = tf.function(model.call_with_cache, jit_compile=True)
    forward = tf.function(lambda ids: model(ids), jit_compile=True)
    cache = model.init_cache(1, MAX_SEQ_LEN)
    token = tf.constant([[5]], tf.int32)
    ids = tf.constant([[(7 * i) % VOCAB for i in range(MAX_SEQ_LEN)]], tf.int32)

    def cached(pos):
        index = tf.constant(pos, tf.int32)

        def call():
            logits, _ = step(token, cache, index)
            logits.numpy()

        return call

    def full(n):
        prefix = ids[:, :n]

        def call():
            forward(prefix).numpy()

        return call

    calls = {}
    for pos in positions:
        calls[("cached_step", pos)] = cached(pos)
        calls[("full_recompute", pos)] = full(pos)
    for fn in calls.values():  # compile: the cached step once, the forward once per length
        fn()
        fn()
    with bc.CpuMeter() as meter:
        times = interleaved(calls, rounds, block)
    series = {"cached_step": {}, "full_recompute": {}}
    for (name, pos), t in times.items():
        series[name][str(pos)] = 1000 * bc.median(t)
    first, last = str(positions[0]), str(positions[-1])
    return {
        "cache_len": MAX_SEQ_LEN,
        "rounds": rounds,
        "calls_per_round": block,
        "ms": series,
        "last_over_first": {k: v[last] / v[first] for k, v in series.items()},
        "cpu": meter.result,
    }


# --------------------------------------------------------------------------------------
# peer: keras-hub LlamaCausalLM
# --------------------------------------------------------------------------------------
PEER_VARIANTS = (("default", {}), ("jit_compile=True", {"jit_compile": True}))


def setup_peer(new_tokens: int) -> tuple[dict, dict] | None:
    """keras-hub's Llama in both compile variants, warmed up: (info, {label: call})."""
    if bc.module_missing("keras_hub"):
        print(
            "[peer] keras-hub is not installed: skipping the keras-hub comparison "
            "(pip install -e .[bench])",
            flush=True,
        )
        return None
    import keras
    import keras_hub
    import numpy as np

    total = len(PROMPT) + new_tokens
    token_ids = np.zeros((1, total), "int32")
    token_ids[0, : len(PROMPT)] = PROMPT
    padding_mask = np.zeros((1, total), bool)
    padding_mask[0, : len(PROMPT)] = True
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}

    info = {
        "api": "keras_hub.models.LlamaCausalLM(preprocessor=None).generate, greedy, "
        "stop_token_ids=None",
        "keras_hub": bc.package_version("keras-hub"),
        "variants": {},
    }
    calls = {}
    for label, compile_kwargs in PEER_VARIANTS:
        keras.utils.set_random_seed(0)  # both variants get the same weights
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=VOCAB,
            num_layers=N_LAYERS,
            num_query_heads=N_HEADS,
            num_key_value_heads=N_HEADS,
            hidden_dim=D_MODEL,
            intermediate_dim=FFN_DIM,
            rope_max_wavelength=10000,
            layer_norm_epsilon=1e-6,
            dropout=0,
            tie_word_embeddings=True,
            dtype="float32",
        )
        info["params"] = backbone.count_params()
        lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
        lm.compile(sampler="greedy", **compile_kwargs)

        def call(lm=lm):
            return lm.generate(inputs, stop_token_ids=None)

        started = time.perf_counter()
        out = call()
        warmup = time.perf_counter() - started
        if not bool(np.all(out["padding_mask"])):
            sys.exit(f"[peer] keras-hub generated fewer than {new_tokens} tokens")
        info["variants"][label] = {
            "jit_compile": getattr(lm, "jit_compile", None),
            "warmup_seconds": warmup,
        }
        calls[label] = call
        print(
            f"[peer] keras-hub {label} ready (jit_compile={getattr(lm, 'jit_compile', None)}, "
            f"first call {warmup:.1f} s)",
            flush=True,
        )
    return info, calls


# --------------------------------------------------------------------------------------
def report(result: dict) -> None:
    ours, peer, cfg = result["ours"], result.get("peer"), result["config"]
    gen = ours["generate"]
    print()
    print(
        f"greedy generation, batch {cfg['batch']}, {cfg['prompt_tokens']}-token prompt, "
        f"{cfg['new_tokens']} new tokens, median of {cfg['reps']} interleaved rounds "
        f"(random weights, {gen['params']:,} parameters each)"
    )
    bc.print_machine(result["machine"])
    rows = [
        [
            "deepseek-tf Generator",
            bc.fmt(gen["tokens_per_sec"], ".0f"),
            bc.fmt(gen["ms_per_token"], ".3f"),
            bc.fmt(gen["warmup_seconds"], ".1f"),
        ]
    ]
    for label, v in (peer or {}).get("variants", {}).items():
        rows.append(
            [
                f"keras-hub Llama ({label})",
                bc.fmt(v["tokens_per_sec"], ".0f"),
                bc.fmt(v["ms_per_token"], ".3f"),
                bc.fmt(v["warmup_seconds"], ".1f"),
            ]
        )
    bc.print_table(["", "tokens/s", "ms/token", "first call s"], rows)
    share = result["timing_cpu"]["others_cpu_share"]
    print(f"other processes' share of the machine while timing: {bc.fmt(share, '.0%')}")
    ratios = result["ratios"]
    if ratios:
        verdict = "meets" if ratios["vs_best"] >= SPEED_GOAL else "misses"
        others = ", ".join(f"{k}: {v:.2f}x" for k, v in ratios["vs_variant"].items())
        print(
            f"tokens/s, deepseek-tf / keras-hub (faster variant, {peer['best_variant']}): "
            f"{ratios['vs_best']:.2f}x ({verdict} the goal of >= {SPEED_GOAL}x); {others}"
        )

    lat = ours.get("latency")
    if lat:
        print()
        print(
            f"deepseek-tf ms per new token at sequence position n (batch 1, XLA, one call "
            f"each; cached step on a {lat['cache_len']}-position cache; median of "
            f"{lat['rounds']} interleaved rounds x {lat['calls_per_round']} calls)"
        )
        positions = list(lat["ms"]["cached_step"])
        rows = [
            ["cached step (call_with_cache)"]
            + [bc.fmt(lat["ms"]["cached_step"][p], ".3f") for p in positions]
            + [bc.fmt(lat["last_over_first"]["cached_step"], ".2f")],
            ["full recompute (model(ids[:, :n]))"]
            + [bc.fmt(lat["ms"]["full_recompute"][p], ".3f") for p in positions]
            + [bc.fmt(lat["last_over_first"]["full_recompute"], ".2f")],
        ]
        bc.print_table(["n", *positions, "last/first"], rows)
    notes = [
        bc.contention_note("the generation timings", result["timing_cpu"]),
        bc.contention_note("the latency series", (lat or {}).get("cpu")),
    ]
    for note in filter(None, notes):
        print(note)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens to generate")
    parser.add_argument(
        "--reps", type=int, default=10, help="timed rounds of generate calls (median)"
    )
    parser.add_argument(
        "--latency-rounds", type=int, default=5, help="interleaved rounds of the latency series"
    )
    parser.add_argument(
        "--latency-block", type=int, default=20, help="timed calls per point and round"
    )
    parser.add_argument("--skip-peer", action="store_true", help="deepseek-tf only")
    parser.add_argument("--skip-latency", action="store_true", help="no per-position series")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.new_tokens <= MAX_SEQ_LEN - len(PROMPT):
        parser.error(f"--new-tokens must be in [1, {MAX_SEQ_LEN - len(PROMPT)}]")
    if min(args.reps, args.latency_rounds, args.latency_block) < 1:
        parser.error("--reps, --latency-rounds and --latency-block must be >= 1")

    quiet_tensorflow()
    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras", "keras-hub"]),
        "config": {
            "batch": 1,
            "prompt": PROMPT,
            "prompt_tokens": len(PROMPT),
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "shape": {
                "n_layers": N_LAYERS,
                "d_model": D_MODEL,
                "n_heads": N_HEADS,
                "ffn_dim": FFN_DIM,
                "vocab": VOCAB,
                "max_seq_len": MAX_SEQ_LEN,
            },
            "dtype": "float32",
        },
        "targets": {"tokens_per_sec_ratio": SPEED_GOAL},
        "ours": {},
        "peer": None,
        "ratios": {},
    }
    model = build_ours()
    ours_info, ours_call = setup_ours(model, args.new_tokens)
    calls = {"ours": ours_call}
    peer = None if args.skip_peer else setup_peer(args.new_tokens)
    if peer is not None:
        peer_info, peer_calls = peer
        calls.update({("peer", label): fn for label, fn in peer_calls.items()})

    result["wait_quiet"] = bc.maybe_wait_quiet("timing", args.wait_quiet)
    print(f"[timing] {args.reps} rounds of {len(calls)} generate calls ...", flush=True)
    with bc.CpuMeter() as meter:
        times = interleaved(calls, args.reps)
    result["timing_cpu"] = meter.result
    result["ours"]["generate"] = {**ours_info, **summarise(times["ours"], args.new_tokens)}
    if peer is not None:
        for label in peer_calls:
            peer_info["variants"][label].update(summarise(times[("peer", label)], args.new_tokens))
        variants = peer_info["variants"]
        best = max(variants, key=lambda k: variants[k]["tokens_per_sec"])
        peer_info["best_variant"] = best
        peer_info["tokens_per_sec"] = variants[best]["tokens_per_sec"]
        result["peer"] = peer_info
        ours_tps = result["ours"]["generate"]["tokens_per_sec"]
        result["ratios"] = {
            "vs_best": bc.ratio(ours_tps, peer_info["tokens_per_sec"]),
            "vs_variant": {k: bc.ratio(ours_tps, v["tokens_per_sec"]) for k, v in variants.items()},
        }
    if not args.skip_latency:
        print(f"[latency] {args.latency_rounds} rounds over positions {POSITIONS} ...", flush=True)
        result["ours"]["latency"] = run_ours_latency(
            model, POSITIONS, args.latency_rounds, args.latency_block
        )
    path = bc.write_json(args.out, result)
    report(result)
    print(f"result: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
