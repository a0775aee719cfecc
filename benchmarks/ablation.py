"""The brief's ablation on `shakespeare-char`: each technique alone against the baseline,
three seeds each, mean +- sd of validation loss, training tokens/s and parameters.

Variants (config overrides on the preset; everything else is the preset's recipe):

- baseline: the preset (4 x 128, RoPE, attention blocks);
- hybrid: `model.blocks=[attention,hybrid]` (layers 2 and 4 add a causal convolution);
- dynamic / rope+dynamic: `model.position` (learned relative-distance bias);
- share ffn / share attention: `model.share_adjacent` (layers 2i and 2i+1 share it);
- share 30%: `model.share_fraction=0.3` (the brief's "30% of the projection matrices");
- token replace / length jitter / embedding noise: each augmentation alone; all three
  (with length jitter the context is 72, to hold its up to 71-token sequences).

Each (variant, seed) trains from scratch for `--steps` steps (the preset's schedule
scaled to them: warm-up 5%, cosine to the minimum), with `train.seed` and `data.seed`
set to the seed; its loss is `deepseek-tf eval` of the finished run on the whole
validation split. Runs are sequential (never two at a time); the seeds of one variant
are spread over the whole invocation (seed-major order), so a slow spell of the shared
machine does not hit one variant alone.

Usage:
    python benchmarks/ablation.py --wait-quiet 120      # 33 runs, ~40 min on 2 cores
    python benchmarks/ablation.py --steps 300 --seeds 1 --variants baseline,hybrid

No peer: this compares variants of deepseek-tf with each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

NAME = "ablation"
PRESET = "shakespeare-char"
# length jitter packs up to 10% longer sequences (71 tokens): the context must hold them
# (RoPE has no position parameters, so the model is otherwise the baseline's)
JITTER_ROOM = "model.max_seq_len=72"
VARIANTS = {
    "baseline": [],
    "hybrid": ["model.blocks=[attention,hybrid]"],
    "dynamic": ["model.position=dynamic"],
    "rope+dynamic": ["model.position=rope+dynamic"],
    "share ffn": ["model.share_adjacent=ffn"],
    "share attention": ["model.share_adjacent=attention"],
    "share 30%": ["model.share_fraction=0.3"],
    "token replace": ["data.token_replace=true"],
    "length jitter": ["data.length_jitter=true", JITTER_ROOM],
    "embedding noise": ["data.embedding_noise=true"],
    "all three augmentations": [
        "data.token_replace=true",
        "data.length_jitter=true",
        "data.embedding_noise=true",
        JITTER_ROOM,
    ],
}


def one_run(variant: str, seed: int, steps: int, root: Path) -> dict:
    from deepseek_tf.api import evaluate, info, train

    overrides = [
        *VARIANTS[variant],
        f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        "train.eval_every=0",
        "train.keep_best=false",
        f"train.checkpoint_every={steps}",
    ]
    out = root / f"{variant.replace(' ', '_').replace('%', 'pc').replace('+', '_')}-{seed}"
    summary = train(preset=PRESET, overrides=overrides, out=out, verbose=0, sample_tokens=0)
    loss = evaluate(out)["loss"]
    params = info(out)["parameters"]["total"]
    return {
        "variant": variant,
        "seed": seed,
        "val_loss": loss,
        "train_tokens_per_s": summary["train_tokens_per_sec"],
        "train_s": summary["train_seconds"],
        "parameters": params,
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=bc.default_out(NAME))
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("DEEPSEEK_TF_XLA_CACHE", "off")
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    waited = bc.maybe_wait_quiet(NAME, args.wait_quiet)
    root = Path(tempfile.mkdtemp(prefix="ablation-"))
    runs = []
    started = time.perf_counter()
    with bc.CpuMeter() as meter:
        for seed in range(1, args.seeds + 1):
            for variant in variants:
                runs.append(one_run(variant, seed, args.steps, root))
                r = runs[-1]
                print(f"[{variant} seed {seed}] val {r['val_loss']:.4f}, "
                      f"{r['train_tokens_per_s']:.0f} tok/s", flush=True)  # fmt: skip
    table = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        loss, loss_sd = _mean_sd([r["val_loss"] for r in mine])
        speed, speed_sd = _mean_sd([r["train_tokens_per_s"] for r in mine])
        table[variant] = {
            "val_loss": loss,
            "val_loss_sd": loss_sd,
            "tokens_per_s": speed,
            "tokens_per_s_sd": speed_sd,
            "parameters": mine[0]["parameters"],
        }
    base = table.get("baseline")
    rows = []
    for variant, t in table.items():
        delta = t["val_loss"] - base["val_loss"] if base else None
        speed = bc.ratio(t["tokens_per_s"], base["tokens_per_s"]) if base else None
        rows.append([
            variant,
            f"{t['val_loss']:.4f} +- {t['val_loss_sd']:.4f}",
            bc.fmt(delta, "+.4f"),
            f"{t['tokens_per_s']:.0f} +- {t['tokens_per_s_sd']:.0f}",
            bc.fmt(speed, ".2f"),
            f"{t['parameters']:,}",
        ])  # fmt: skip
    bc.print_table(["variant", "val loss", "vs base", "train tok/s", "x base", "params"], rows)
    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras"]),
        "quiet": waited,
        "contention": meter.result,
        "steps": args.steps,
        "seeds": args.seeds,
        "wall_s": time.perf_counter() - started,
        "table": table,
        "runs": runs,
    }
    return bc.finish(NAME, meter.result, args.out, result)


if __name__ == "__main__":
    sys.exit(main())
