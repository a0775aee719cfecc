"""Auxiliary-loss-free load balancing and MTP on the `shakespeare-moe` preset.

Trains the small MLA + DeepSeekMoE model three times on tiny Shakespeare (each
run is `deepseek-tf train`, one after the other):

- `balanced`: the preset (bias balancing gamma=0.01, no auxiliary loss, MTP depth 1);
- `no_balance`: the same with `model.bias_update_speed=0` (the routing bias never
  moves): what the bias update buys;
- `no_mtp`: the preset with `model.mtp_depth=0`: MTP on vs off.

Reports the curve of the worst layer's max/mean expert load (1.0 = perfect balance),
its mean after warm-up, and the final validation loss of each run.

    python benchmarks/moe_balance.py            # ~6 min on 2 cores
    python benchmarks/moe_balance.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import default_out, machine_info, print_machine, print_table, write_json

RUNS = {
    "balanced": [],
    "no_balance": ["model.bias_update_speed=0"],
    "no_mtp": ["model.mtp_depth=0"],
}


def train(out: Path, steps: int, overrides: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "deepseek_tf.cli.main",
        "train",
        "--preset",
        "shakespeare-moe",
        "--out",
        str(out),
        "--sample-tokens",
        "0",
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.log_every=10",
        "--set",
        f"train.eval_every={steps}",
    ]
    for override in overrides:
        cmd += ["--set", override]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def summarise(run_dir: Path, warmup: int) -> dict:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(e["step"], e["load_max_mean"]) for e in entries if "load_max_mean" in e]
    after = [v for s, v in curve if s > warmup]
    val = [e["val_loss"] for e in entries if "val_loss" in e]
    mtp = [e["mtp_loss"] for e in entries if "mtp_loss" in e]
    return {
        "load_max_mean_curve": curve,
        "load_max_mean_after_warmup": sum(after) / len(after),
        "load_max_mean_worst_after_warmup": max(after),
        "final_val_loss": val[-1],
        "final_mtp_loss": mtp[-1] if mtp else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200, help="steps excluded from the mean")
    parser.add_argument("--out", default=default_out("moe_balance"))
    args = parser.parse_args()
    results = {"machine": machine_info(["tensorflow", "keras"]), "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            seconds = train(Path(tmp) / name, args.steps, overrides)
            results["runs"][name] = {
                **summarise(Path(tmp) / name, args.warmup),
                "overrides": overrides,
                "wall_seconds": seconds,
            }
    print_machine(results["machine"])
    rows = []
    for name, r in results["runs"].items():
        rows.append(
            [
                name,
                f"{r['load_max_mean_after_warmup']:.3f}",
                f"{r['load_max_mean_worst_after_warmup']:.3f}",
                f"{r['final_val_loss']:.4f}",
                f"{r['wall_seconds']:.0f}",
            ]
        )
    print_table(["run", "max/mean load (mean after warm-up)", "worst", "val loss", "wall s"], rows)
    curve = results["runs"]["balanced"]["load_max_mean_curve"]
    marks = [p for p in curve if p[0] in (10, 50, 100, 200, 500, 1000, 1500, 2000)]
    print("balanced curve (step, max/mean):", ", ".join(f"{s}: {v:.2f}" for s, v in marks))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
