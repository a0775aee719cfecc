"""Memory and speed of one training step: remat, precision and XLA.

Each variant runs in its own process (so peak memory is its own): it builds an
8-layer model, the optimizer and the compiled training step of deepseek-tf's
trainer, then runs steps on random token batches. Reported per variant:

- `peak MiB`: the process's peak resident memory (`ru_maxrss`) after its first step;
- `step MiB`: that peak minus the resident memory just before the first step (model,
  optimizer state and TensorFlow runtime in place): what the step adds -- activations,
  gradients and temporaries, plus, with XLA, the compiler's own peak (which dominates:
  compare remat only between the no-XLA variants, where nothing is compiled);
- `step alloc MiB`: TensorFlow's allocator peak during the later (compiled) steps over
  what it held before them (`tf.config.experimental.get_memory_info`, CPU or GPU):
  what a training step needs at steady state -- activations kept for the backward
  pass, gradients, temporaries -- without tracing or compilation. This is the column
  that shows what remat saves (process RSS cannot: after the first step the allocator
  reuses its memory);
- `ms/step` and tokens/s: median of the timed steps (compilation excluded).

Variants: remat none vs blocks (fp32, XLA), fp32 vs mixed_bfloat16 (XLA), and
XLA on vs off (fp32). The brief's figure for gradient checkpointing is -40% memory.

    python benchmarks/memory.py                       # ~3 min on 2 cores
    python benchmarks/memory.py --layers 8 --d-model 256 --seq-len 256 --batch 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench_common import default_out, machine_info, print_machine, print_table, write_json

VARIANTS = {
    "fp32, remat none, XLA": ["model.remat=none"],
    "fp32, remat blocks, XLA": ["model.remat=blocks"],
    "bf16, remat none, XLA": ["train.precision=mixed_bfloat16"],
    "fp32, remat none, no XLA": ["runtime.jit_compile=false"],
    "fp32, remat blocks, no XLA": ["runtime.jit_compile=false", "model.remat=blocks"],
    "bf16, remat none, no XLA": ["runtime.jit_compile=false", "train.precision=mixed_bfloat16"],
}

WORKER = r"""
import json, os, resource, statistics, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# CPU allocator statistics (get_memory_info) exist only with TensorFlow's BFC allocator
# off Intel's oneDNN builds (see deepseek_tf.training.autobatch)
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
import numpy as np
import psutil
from deepseek_tf.config.loader import load_config
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.optim import make_optimizer
from deepseek_tf.training.step import make_train_step

args = json.loads(sys.argv[1])
config = load_config("shakespeare-char", overrides=args["overrides"])
model = build_model(config, vocab_size=256, seed=0)
optimizer = make_optimizer(config.train, model)
step = make_train_step(model, optimizer, accumulation=1, replicas=1, sparsity_threshold=0.01,
                       jit_compile=config.runtime.jit_compile, clip_norm=config.train.clip_norm)
rng = np.random.RandomState(0)
ids = rng.randint(0, 256, (args["batch"], args["seq_len"] + 1)).astype("int32")
inputs, targets = ids[:, :-1], ids[:, 1:]
weights = np.ones(inputs.shape, "float32")
before = psutil.Process().memory_info().rss
float(step(inputs, targets, weights)["loss"])  # the first step: trace (+ compile), run
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import tensorflow as tf
device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
steady_before = tf.config.experimental.get_memory_info(device)["current"]
tf.config.experimental.reset_memory_stats(device)
times = []
for _ in range(args["steps"]):
    t0 = time.perf_counter()
    float(step(inputs, targets, weights)["loss"])
    times.append(time.perf_counter() - t0)
steady = tf.config.experimental.get_memory_info(device)["peak"] - steady_before
print(json.dumps({"before_mib": before / 2**20, "peak_mib": peak / 2**20,
                  "steady_step_mib": steady / 2**20,
                  "step_s": statistics.median(times), "params": model.count_params()}))
"""


def run_variant(overrides: list[str], args) -> dict:
    shape = [
        f"model.n_layers={args.layers}",
        f"model.d_model={args.d_model}",
        f"model.n_heads={args.d_model // 64}",
        f"model.ffn_dim={args.d_model * 8 // 3 // 32 * 32}",
        f"model.max_seq_len={args.seq_len}",
        f"data.seq_len={args.seq_len}",
    ]
    payload = {
        "overrides": shape + overrides,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
    }
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(payload)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["step_mib"] = result["peak_mib"] - result["before_mib"]
    result["tokens_per_s"] = args.batch * args.seq_len / result["step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=default_out("memory"))
    args = parser.parse_args()
    results = {
        "machine": machine_info(["tensorflow", "keras"]),
        "shape": vars(args),
        "variants": {name: run_variant(o, args) for name, o in VARIANTS.items()},
    }
    print_machine(results["machine"])
    base = results["variants"]["fp32, remat none, XLA"]
    rows = []
    for name, r in results["variants"].items():
        rows.append(
            [
                name,
                f"{r['peak_mib']:.0f}",
                f"{r['step_mib']:.0f}",
                f"{r['step_mib'] / base['step_mib'] - 1:+.0%}",
                f"{r['steady_step_mib']:.0f}",
                f"{r['steady_step_mib'] / base['steady_step_mib'] - 1:+.0%}",
                f"{r['step_s'] * 1e3:.1f}",
                f"{r['tokens_per_s']:.0f}",
                f"{base['step_s'] / r['step_s']:.2f}x",
            ]
        )
    print_table(
        [
            "variant",
            "peak MiB",
            "step MiB",
            "vs base",
            "step alloc MiB",
            "vs base",
            "ms/step",
            "tok/s",
            "speed",
        ],
        rows,
    )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
