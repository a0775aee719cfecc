"""MTP speculative decoding against plain decoding on a trained `shakespeare-moe` run.

Trains the preset (MLA, DeepSeekMoE, one MTP module; `deepseek-tf train --preset
shakespeare-moe`, run as a subprocess) unless `--run` names a run to reuse, then decodes
the same prompts with `Generator(model)` (plain: one cached step per token) and
`Generator(model, speculative="mtp")` (the MTP module drafts, one pass of the model
verifies), both XLA-compiled:

1. greedy, batch 1 (each prompt alone) and batch 8 (all prompts in one call): whether
   the outputs are identical, tokens/s of both (median of interleaved rounds: each round
   calls each contender once untimed, then once timed), the acceptance rate per draft
   position and the tokens settled per verify round;
2. sampling (temperature 0.8, batch 1): the same figures (outputs differ: speculative
   sampling keeps the distribution, not the random stream);
3. the cost of one compiled cached call of the model over 1 and over `k + 1` tokens (the
   verify pass), and of one MTP module over `k + 1` tokens: what a round costs.

Usage:
    python benchmarks/speculative.py                    # trains ~2000 steps, then ~2 min
    python benchmarks/speculative.py --run RUN_DIR      # reuse a trained run
    python benchmarks/speculative.py --steps 100 --rounds 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

NAME = "speculative"
PRESET = "shakespeare-moe"
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING HENRY VI:", "MENENIUS:", "Nurse:",
           "GLOUCESTER:", "LADY CAPULET:"]  # fmt: skip
SPEED_GOAL = 1.5  # speculative / plain tokens/s, greedy, batch 1


def train(out: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "deepseek_tf.cli.main", "train", "--preset", PRESET,
           "--out", str(out), "--sample-tokens", "0", "--set", f"train.steps={steps}",
           "--set", f"train.eval_every={steps}",
           "--set", f"train.checkpoint_every={steps}"]  # fmt: skip
    print(f"[train] {' '.join(cmd[2:])}", flush=True)
    with bc.CpuMeter() as meter:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return {"steps": steps, "command": " ".join(cmd[2:]), "cpu": meter.result}


def run_summary(run: Path) -> dict:
    entries = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = {}
    for e in entries:
        keys = ("val_loss", "mtp_loss", "step", "train_seconds", "train_tokens_per_sec")
        last.update({k: e[k] for k in keys if k in e})
    return last


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            fn()
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def compare(model, tok, prompts, batch, new_tokens, rounds, sampling) -> dict:
    """Plain vs speculative decoding of `prompts` (`batch` per call)."""
    from deepseek_tf.generation.generate import Generator

    plain = Generator(model, vocab_limit=tok.vocab_size)
    spec = Generator(model, vocab_limit=tok.vocab_size, speculative="mtp")
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]

    def decode(gen):
        return lambda: [row for g in groups for row in gen.generate(g, new_tokens, **sampling)]

    outputs = {"plain": decode(plain)(), "speculative": decode(spec)()}  # compiles both
    base = spec.speculative.proposed.copy(), spec.speculative.accepted.copy()
    rounds_before = spec.speculative.rounds
    with bc.CpuMeter() as meter:
        times = interleaved({"plain": decode(plain), "speculative": decode(spec)}, rounds)
    proposed = spec.speculative.proposed - base[0]
    accepted = spec.speculative.accepted - base[1]
    verify_rounds = (spec.speculative.rounds - rounds_before) / (2 * rounds)  # per pass
    total = sum(len(r) for r in outputs["speculative"])
    result = {"batch": batch, "sampling": sampling, "new_tokens": total, "cpu": meter.result}
    for name, t in times.items():
        med = bc.median(t)
        result[name] = {"seconds": t, "median_seconds": med, "tokens_per_sec": total / med}
    result["speedup"] = result["speculative"]["tokens_per_sec"] / result["plain"]["tokens_per_sec"]
    result["identical_output"] = outputs["plain"] == outputs["speculative"]
    result["acceptance_per_position"] = (accepted / proposed).tolist()
    # tokens each row settles per verify pass (prefill's first token excluded)
    result["tokens_per_round"] = (total - len(prompts)) / verify_rounds / batch
    result["sample"] = tok.decode(outputs["speculative"][0])
    return result


def call_costs(model, k: int, calls: int = 200) -> dict:
    """ms per compiled cached call: the model over 1 and `k + 1` tokens, MTP depth 1 over
    `k + 1` (inside one XLA while-loop, so dispatch is not counted)."""
    import tensorflow as tf

    def timed(step, cache):
        @tf.function(jit_compile=True)
        def run(cache):
            def body(i, cache, acc):
                out, cache = step(cache, i % 32)
                return i + 1, cache, acc + out

            return tf.while_loop(lambda i, c, a: i < calls, body, (0, cache, 0.0))  # fmt: skip

        run(cache)[2].numpy()
        best = min(_time(lambda: run(cache)[2].numpy()) for _ in range(5))
        return 1000 * best / calls

    def main_step(t):
        def step(cache, i):
            logits, cache = model.call_with_cache(tf.zeros((1, t), tf.int32), cache, i)
            return logits[0, 0, 0], cache

        return timed(step, model.init_cache(1, 64))

    module = model.mtp_modules[0]

    def mtp_step(cache, i):
        h = tf.ones((1, k + 1, model.d_model))
        out = module(h, model.embed(tf.zeros((1, k + 1), tf.int32)), cache=cache, cache_index=i)
        return model.project(out["x"][:, -1:])[0, 0, 0], out["cache"]

    return {
        "model_1_token_ms": main_step(1),
        f"model_{k + 1}_tokens_ms": main_step(k + 1),
        f"mtp_{k + 1}_tokens_ms": timed(mtp_step, module.init_cache(1, 64)),
    }


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def report(result: dict) -> None:
    bc.print_machine(result["machine"])
    t = result["training"]
    print(f"run: {t['run']} ({t.get('step')} steps, val loss {bc.fmt(t.get('val_loss'), '.4f')}, "
          f"MTP loss {bc.fmt(t.get('mtp_loss'), '.4f')})")  # fmt: skip
    rows = []
    for label, r in result["settings"].items():
        rows.append([
            label,
            bc.fmt(r["plain"]["tokens_per_sec"], ".0f"),
            bc.fmt(r["speculative"]["tokens_per_sec"], ".0f"),
            bc.fmt(r["speedup"], ".2f") + "x",
            " / ".join(f"{a:.1%}" for a in r["acceptance_per_position"]),
            bc.fmt(r["tokens_per_round"], ".2f"),
            "yes" if r["identical_output"] else "no",
            bc.fmt(r["cpu"]["others_cpu_share"], ".0%"),
        ])  # fmt: skip
    bc.print_table(["", "plain tok/s", "spec tok/s", "speedup", "acceptance", "tok/round",
                    "identical", "others' CPU"], rows)  # fmt: skip
    costs = result["call_costs_ms"]
    print("compiled cached call, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
    greedy = result["settings"]["greedy, batch 1"]["speedup"]
    verdict = "meets" if greedy >= SPEED_GOAL else "misses"
    print(f"greedy batch 1: {greedy:.2f}x ({verdict} the goal of >= {SPEED_GOAL}x)")
    for r in result["settings"].values():
        note = bc.contention_note("a timed phase", r["cpu"])
        if note:
            print(note)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a trained run with MTP modules (default: train one)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument("--keep-run", help="train into this directory and keep it")
    parser.add_argument("--new-tokens", type=int, default=48, help="per prompt (context 64)")
    parser.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    parser.add_argument(
        "--retries", type=int, default=3, help="times a phase others used > 10%% of is redone"
    )
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    result = {"benchmark": NAME, "machine": bc.machine_info(["tensorflow", "keras"])}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run or args.keep_run or Path(tmp) / PRESET)
        training = {"run": str(run) if args.run or args.keep_run else f"(trained, {PRESET})"}
        if not args.run:
            training.update(train(run, args.steps))
        training.update(run_summary(run))
        result["training"] = training

        import tensorflow as tf

        from deepseek_tf.api import load

        tf.get_logger().setLevel("ERROR")
        model, tok = load(run)
    k = len(model.mtp_modules)
    prompts = [tok.encode(p) for p in PROMPTS]
    if max(map(len, prompts)) + args.new_tokens > model.max_seq_len:
        parser.error(f"--new-tokens: prompts + new tokens exceed the context {model.max_seq_len}")
    result["config"] = {"prompts": PROMPTS, "new_tokens_per_prompt": args.new_tokens,
                        "rounds": args.rounds, "draft_tokens": k, "dtype": "float32"}  # fmt: skip
    settings = {
        "greedy, batch 1": (1, {}),
        "greedy, batch 8": (8, {}),
        "sampled (T=0.8), batch 1": (1, {"temperature": 0.8, "seed": 1}),
    }
    result["settings"], result["wait_quiet"] = {}, {}
    for label, (batch, sampling) in settings.items():
        for attempt in range(1 + args.retries):  # a contended phase is timed again
            result["wait_quiet"][label] = bc.maybe_wait_quiet(label, args.wait_quiet)
            print(f"[{label}] {args.rounds} interleaved rounds ...", flush=True)
            r = compare(model, tok, prompts, batch, args.new_tokens, args.rounds, sampling)
            result["settings"][label] = {**r, "attempt": attempt + 1}
            if not bc.contention_note(label, r["cpu"]):
                break
    bc.maybe_wait_quiet("call costs", args.wait_quiet)
    result["call_costs_ms"] = call_costs(model, k)
    path = bc.write_json(args.out, result)
    report(result)
    print(f"result: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
