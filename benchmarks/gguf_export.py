"""GGUF export of a `shakespeare-moe` run: file size per type, and llama.cpp's decoding of
the exported files beside deepseek-tf's own, in one invocation.

1. The run: `--run DIR` (a `shakespeare-moe` run), or one trained here for `--steps`
   (speed does not depend on the weights; greedy agreement is reported for each file).
2. `deepseek-tf export --format gguf` at f32, bf16, q8_0 and q4_0: seconds and bytes.
3. Decoding, batch 1, greedy, an 8-token prompt and `--new-tokens` new tokens, each
   contender warmed up once, then `--rounds` rounds in which every contender runs once
   in turn; the median gives tokens/s (prefill included, as a user waits for it):
   - deepseek-tf: `Generator` (prefill + one XLA while-loop), float32;
   - llama.cpp (llama-cpp-python built from its source distribution, with 1 and with 2
     threads; the faster is its figure): the exported files, token by token through its
     KV cache.
   The tokens each llama.cpp file produces are compared with deepseek-tf's.

Usage:
    python benchmarks/gguf_export.py --wait-quiet 120          # ~4 min on 2 cores
    python benchmarks/gguf_export.py --run runs/moe

llama-cpp-python is a benchmark- and test-only dependency (`pip install llama-cpp-python`
compiles llama.cpp: 15-25 min on 2 cores); without it only sizes are reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

NAME = "gguf_export"
QUANTS = ("f32", "bf16", "q8_0", "q4_0")
PROMPT = "ROMEO:\nI "


def train_run(out: Path, steps: int) -> Path:
    from deepseek_tf.api import train
    from deepseek_tf.config.loader import load_config

    overrides = [f"train.steps={steps}", "train.eval_every=0", "train.keep_best=false"]
    config = load_config("shakespeare-moe", overrides=overrides)
    train(config, out=out, verbose=0, sample_tokens=0)
    return out


def time_rounds(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Every call once per round, in turn (a slow spell hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a shakespeare-moe run (default: train one)")
    parser.add_argument("--steps", type=int, default=200, help="training steps without --run")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default=bc.default_out(NAME))
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("DEEPSEEK_TF_XLA_CACHE", "off")

    import numpy as np

    from deepseek_tf.api import load
    from deepseek_tf.api.deployment import export
    from deepseek_tf.export.gguf_verify import llama_greedy, open_llama
    from deepseek_tf.generation.generate import Generator

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    run = Path(args.run) if args.run else train_run(work / "run", args.steps)
    model, tokenizer = load(run)
    prompt = tokenizer.encode(PROMPT)
    n = args.new_tokens
    files = {}
    for quant in QUANTS:
        path = work / f"moe-{quant}.gguf"
        start = time.perf_counter()
        report = export(run, format="gguf", out=path, quant=quant, verify=False)
        files[quant] = {"path": str(path), "bytes": report["bytes"],
                        "export_s": time.perf_counter() - start}  # fmt: skip
        print(f"[export] {quant}: {report['bytes'] / 1e6:.2f} MB", flush=True)

    gen = Generator(model)
    want = [int(t) for t in np.asarray(gen.generate([prompt], max_new_tokens=n))[0][-n:]]
    calls = {"deepseek-tf": lambda: gen.generate([prompt], max_new_tokens=n)}
    llms = {(q, t): open_llama(f["path"], n_ctx=model.max_seq_len, n_threads=t)
            for q, f in files.items() for t in (1, 2)}  # fmt: skip
    if None in llms.values():
        print("[llama.cpp] llama-cpp-python is not installed: sizes only", flush=True)
        llms = {}
    for (quant, threads), llm in llms.items():
        got = llama_greedy(llm, prompt, n)  # also the warm-up
        files[quant]["greedy_equal_tokens"] = sum(a == b for a, b in zip(got, want))
        calls[f"llama.cpp {quant} {threads}t"] = lambda llm=llm: llama_greedy(llm, prompt, n)
    waited = bc.maybe_wait_quiet(NAME, args.wait_quiet)
    with bc.CpuMeter() as meter:
        times = time_rounds(calls, args.rounds)
    speed = {name: n / bc.median(t) for name, t in times.items()}
    for quant in files if llms else ():
        speed[f"llama.cpp {quant}"] = max(speed[f"llama.cpp {quant} {t}t"] for t in (1, 2))
    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras", "gguf", "llama_cpp_python"]),
        "quiet": waited,
        "contention": meter.result,
        "run": str(run),
        "parameters": int(model.count_params()),
        "prompt_tokens": len(prompt),
        "new_tokens": n,
        "files": files,
        "tokens_per_s": speed,
        "vs_deepseek_tf": {k: bc.ratio(v, speed["deepseek-tf"]) for k, v in speed.items()},
    }
    rows = [[q, f"{f['bytes'] / 1e6:.2f}", bc.fmt(speed.get(f"llama.cpp {q}"), ".0f"),
             bc.fmt(result["vs_deepseek_tf"].get(f"llama.cpp {q}"), ".2f"),
             f"{f.get('greedy_equal_tokens', '-')}/{n}"] for q, f in files.items()]  # fmt: skip
    rows.append(["deepseek-tf (f32)", "-", f"{speed['deepseek-tf']:.0f}", "1.00", "-"])
    bc.print_table(["file", "MB", "tok/s", "x deepseek-tf", "greedy = ours"], rows)
    return bc.finish(NAME, meter.result, args.out, result)


if __name__ == "__main__":
    sys.exit(main())
