"""The Shakespeare speedrun: validation loss against wall-clock time on this machine.

One invocation runs, one after the other (never at the same time):

1. ours: `deepseek-tf train --preset shakespeare-speedrun --out DIR --sample-tokens 0`
   as a subprocess, for `--minutes` of wall time (the preset's own time limit, scaled).
   The clock starts before the process does, so Python and TensorFlow start-up, XLA
   compilation, every evaluation and checkpoint count. Each evaluation (the whole
   validation split, as `eval` measures it) is stamped with the wall clock. Then
   `deepseek-tf eval DIR` reads the model the run saved (`train.keep_best`).
2. peer: nanoGPT (`nanogpt_peer.py`, PyTorch) in its fastest setting on this machine
   (`--peer-speed`) for the same wall time, evaluated on the same validation blocks
   every `--peer-eval-minutes`. `--peer-recipe preset` (default): the preset's shape
   and hyper-parameters (6 x 256, 4 heads, context 256, batch 32, dropout 0.1, AdamW
   lr 1e-3 cosine to 1e-4 after 100 warm-up steps) with nanoGPT's GELU MLP (4 x 256,
   the same parameters within 1%) and its iterations fitted to the hour at the speed
   its trial measured, so the two sides differ by framework, not recipe. `gpu`:
   nanoGPT's GPU recipe as it ships (6 x 384, batch 64, 5,000 iterations).

It writes the table (time to 1.60 / 1.55 / 1.50 / 1.47, best loss) and a PNG of
validation loss against wall-clock time for both (`results/speedrun.png`).

`--ablate` runs the ablation table instead: the preset and one-lever variants of it
(`ABLATIONS`), each trained for the same `--ablation-minutes` of wall time: the
validation loss then, the steps reached, training tokens/s and MFU.

Usage:
    python benchmarks/speedrun.py                        # 60 + 60 minutes
    python benchmarks/speedrun.py --minutes 3            # smoke run of both sides
    python benchmarks/speedrun.py --skip-peer            # deepseek-tf only
    python benchmarks/speedrun.py --ablate               # the ablation table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc
import flops
import yaml
from nanogpt_peer import GPU, Recipe, import_torch, run_peer_for
from peer_speed import add_speed_arg, parse_speed
from shakespeare_char import cli_command, read_metrics

NAME = "speedrun"
PRESET = "shakespeare-speedrun"
THRESHOLDS = (1.60, 1.55, 1.50, 1.47)
GOAL = 1.47  # nanoGPT's GPU recipe after 5,000 iterations (its README: 1.4697)
VOCAB = 65  # tiny Shakespeare's characters
# nanoGPT at the preset's shape and hyper-parameters (max_iters: fitted to the hour)
PRESET_SHAPED = Recipe(n_layer=6, n_head=4, n_embd=256, block_size=256, dropout=0.1,
                       batch_size=32)  # fmt: skip
FIT_SHARE = 0.92  # of the peer's minutes spent in training steps (the rest: evaluations)

# One lever changed at a time against the preset; every row trains for the same wall
# time (--ablation-minutes, compilation included) at the peak learning rate (a cosine
# over 100,000 steps barely moves in minutes) and reports the validation loss then.
ABLATIONS = {
    "preset": [],
    "Muon instead of AdamW": ["train.optimizer=muon"],
    "Lion (lr 3e-4) instead of AdamW": ["train.optimizer=lion", "train.learning_rate=3e-4"],
    "float32, XLA (the library's default)": ["train.precision=float32", "runtime.jit_compile=true"],
    "mixed_bfloat16 with XLA": ["runtime.jit_compile=true"],
    "4 layers instead of 6": ["model.n_layers=4"],
    "batch 64 instead of 32": ["train.batch_size=64"],
    "MTP depth 1 (weight 0.3)": ["model.mtp_depth=1"],
    "MoE: 8 routed (top 2) + 1 shared, same active width": [
        "model.n_routed_experts=8",
        "model.num_experts_per_tok=2",
        "model.n_shared_experts=1",
        "model.moe_ffn_dim=240",
        "model.first_k_dense_replace=1",
        "model.bias_update_speed=0.01",
    ],
    "MLA (kv rank 64, q rank 0)": [
        "model.attention=mla",
        "model.q_lora_rank=0",
        "model.kv_lora_rank=64",
        "model.qk_nope_head_dim=48",
        "model.qk_rope_head_dim=16",
        "model.v_head_dim=64",
    ],
}


def first_below(curve: list[dict], threshold: float) -> float | None:
    """Wall seconds of the first evaluation at or below `threshold` (None: never)."""
    for point in curve:
        if point["val_loss"] <= threshold:
            return point["seconds"]
    return None


def run_ours(run_dir: Path, overrides=(), preset: str = PRESET) -> dict:
    """`deepseek-tf train --preset PRESET` as a subprocess, its validations stamped with
    wall seconds since just before the process started (`curve`)."""
    cmd = [*cli_command(), "train", "--preset", preset, "--out", str(run_dir)]
    cmd += ["--sample-tokens", "0"]
    for item in overrides:
        cmd += ["--set", item]
    print(f"[ours] {' '.join(cmd)}", flush=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    started_epoch, started = time.time(), time.perf_counter()
    with bc.CpuMeter() as meter, log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"[ours] deepseek-tf train failed (exit {proc.returncode}):\n{tail}")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    summary = [m for m in metrics if m.get("event") == "summary"][-1]
    curve = [
        {"seconds": m["time"] - started_epoch, "step": m["step"], "val_loss": m["val_loss"]}
        for m in metrics
        if "val_loss" in m
    ]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    t = config["train"]
    result = {
        "command": " ".join(cmd),
        "steps": summary["step"],
        "planned_steps": t["steps"],
        "stopped": summary.get("stopped", "completed"),
        "curve": curve,
        "best_val_loss": min(p["val_loss"] for p in curve),
        "final_val_loss": curve[-1]["val_loss"],
        "train_tokens_per_sec": summary["train_tokens_per_sec"],
        "tokens": summary["step"] * t["batch_size"] * config["data"]["seq_len"],
        "wall_seconds": wall,
        "cpu": meter.result,
        "precision": t["precision"],
        "flops_per_token": flops.model_flops(config["model"], VOCAB, config["data"]["seq_len"]),
    }
    print(
        f"[ours] best val {result['best_val_loss']:.4f} after {result['steps']} steps, "
        f"{result['train_tokens_per_sec']:.0f} tokens/s, wall {wall:.0f} s",
        flush=True,
    )
    return result


def eval_saved(run_dir: Path) -> dict:
    """`deepseek-tf eval RUN` on the finished run: the model it saved (keep_best)."""
    cmd = [*cli_command(), "eval", str(run_dir)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:  # reported, not fatal: the hour's curve is still written
        error = proc.stderr.strip()[-500:]
        print(f"[ours] {' '.join(cmd)} failed: {error}", flush=True)
        return {"command": " ".join(cmd), "error": error}
    loss = json.loads(proc.stdout.strip().splitlines()[-1])["loss"]
    print(f"[ours] deepseek-tf eval of the saved run: {loss:.4f}", flush=True)
    return {"command": " ".join(cmd), "loss": loss, "seconds": time.perf_counter() - started}


def fitted(minutes: float):
    """`fit(tokens_per_sec)` for `run_peer_for`: the preset-shaped recipe whose cosine
    schedule ends inside `minutes` at that speed (as the preset's steps do for ours)."""

    def fit(tokens_per_sec: float) -> Recipe:
        per_step = PRESET_SHAPED.batch_size * PRESET_SHAPED.block_size
        iters = int(FIT_SHARE * 60 * minutes * tokens_per_sec / per_step)
        print(f"[peer] {iters} iterations fitted to {minutes:g} minutes", flush=True)
        return dataclasses.replace(
            PRESET_SHAPED, max_iters=max(iters, 2 * PRESET_SHAPED.warmup_iters)
        )

    return fit


def time_limit_override(minutes: float) -> str:
    """The preset's time limit for a `minutes` budget: start-up and the last evaluation
    and checkpoint come on top of the training loop's limit (~1 min here, kept 1.5)."""
    return f"train.time_limit_minutes={max(minutes - 1.5, 0.25):g}"


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (
        ("ours", "deepseek-tf shakespeare-speedrun"),
        ("peer", "nanoGPT (PyTorch)"),
    ):
        run = result.get(key)
        if run:
            xs = [p["seconds"] / 60 for p in run["curve"]]
            ax.plot(xs, [p["val_loss"] for p in run["curve"]], marker=".", label=label)
    ax.axhline(GOAL, color="grey", linestyle="--", linewidth=1, label=f"{GOAL} (goal)")
    ax.set_xlabel("wall-clock minutes (start-up, compilation, evaluations included)")
    ax.set_ylabel("validation loss (whole split)")
    ax.set_ylim(1.35, 2.6)
    ax.set_title(f"tiny Shakespeare, 2-core CPU ({result['machine'].get('cpu', '')})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def peer_flops_per_token(recipe: dict) -> float:
    """nanoGPT's GPT: a 4x GELU MLP (8 * width^2 weights per layer)."""
    d = recipe["n_embd"]
    return flops.dense_flops_per_token(recipe["n_layer"], d, 8 * d * d, VOCAB, recipe["block_size"])


def utilisation(run: dict, peaks: dict | None, dtype: str) -> float | None:
    per_token = run.get("flops_per_token")
    if not per_token or not peaks:
        return None
    return flops.mfu(run["train_tokens_per_sec"], per_token, peaks[dtype])


def report(result: dict) -> None:
    print()
    bc.print_machine(result["machine"])
    peaks = result.get("matmul_peak")
    if peaks:
        print(
            f"matmul peak: float32 {peaks['float32'] / 1e9:.0f} GFLOP/s, "
            f"bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s"
        )
    rows = []
    for key, label in (("ours", "deepseek-tf"), ("peer", "nanoGPT (PyTorch)")):
        run = result.get(key)
        if not run:
            continue
        best = min(p["val_loss"] for p in run["curve"])
        times = [first_below(run["curve"], th) for th in THRESHOLDS]
        dtype = "bfloat16" if "bfloat16" in run.get("precision", "float32") else "float32"
        rows.append(
            [
                label,
                *(bc.fmt(x and x / 60, ".1f") for x in times),
                f"{best:.4f}",
                bc.fmt(run.get("saved_eval", {}).get("loss"), ".4f"),
                bc.fmt(run["train_tokens_per_sec"], ".0f"),
                bc.fmt(utilisation(run, peaks, dtype), ".0%") + f" ({dtype[:4]})",
                bc.fmt(run["wall_seconds"] / 60, ".1f"),
                bc.fmt(run["cpu"]["others_cpu_share"], ".0%"),
            ]
        )
    heads = [f"min to {th:.2f}" for th in THRESHOLDS]
    bc.print_table(
        ["", *heads, "best val", "eval of saved", "train tok/s", "MFU", "wall min", "others' CPU"],
        rows,
    )


def ablate(args) -> dict:
    rows = {}
    minutes = args.ablation_minutes
    chosen = list(ABLATIONS.items())
    if args.rows:
        chosen = [chosen[int(i)] for i in args.rows.split(",")]
    for label, overrides in chosen:
        schedule = [
            "train.steps=100000",
            "train.warmup_steps=20",
            "train.eval_every=100000",
            "train.checkpoint_every=100000",
            f"train.time_limit_minutes={minutes:g}",
        ]
        with tempfile.TemporaryDirectory(prefix="speedrun-ablate-") as tmp:
            bc.maybe_wait_quiet(label, args.wait_quiet)
            rows[label] = run_ours(Path(tmp) / "run", [*schedule, *overrides])
            rows[label]["overrides"] = overrides
    return rows


def ablation_table(rows: dict, minutes: float, peaks: dict) -> None:
    print()
    table = []
    base = rows["preset"]
    for label, r in rows.items():
        dtype = "bfloat16" if "bfloat16" in r["precision"] else "float32"
        table.append(
            [
                label,
                f"{r['steps']}",
                f"{r['final_val_loss']:.4f}",
                f"{r['final_val_loss'] - base['final_val_loss']:+.4f}",
                f"{r['train_tokens_per_sec']:.0f}",
                f"{r['train_tokens_per_sec'] / base['train_tokens_per_sec']:.2f}x",
                bc.fmt(utilisation(r, peaks, dtype), ".0%"),
                bc.fmt(r["cpu"]["others_cpu_share"], ".0%"),
            ]
        )
    heads = ["", "steps", f"val @ {minutes:g} min", "vs preset", "train tok/s", "speed", "MFU"]
    bc.print_table([*heads, "others' CPU"], table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="wall time of each side")
    parser.add_argument("--peer-minutes", type=float, help="the peer's (default: --minutes)")
    parser.add_argument("--peer-eval-minutes", type=float, default=5.0)
    parser.add_argument("--skip-peer", action="store_true", help="run deepseek-tf only")
    add_speed_arg(parser)
    parser.add_argument(
        "--peer-recipe", choices=("preset", "gpu"), default="preset",
        help="preset: nanoGPT at the preset's shape, schedule fitted to the hour; "
        "gpu: nanoGPT's GPU recipe as shipped",
    )  # fmt: skip
    parser.add_argument("--skip-ours", action="store_true", help="run the PyTorch peer only")
    parser.add_argument("--ablate", action="store_true", help="the ablation table instead")
    parser.add_argument(
        "--ablation-minutes", type=float, default=2.0, help="training time of each row"
    )
    parser.add_argument("--rows", help="ablation rows to run, by index (e.g. 0,1,5)")
    parser.add_argument("--rows-from", help="earlier ablation JSON whose rows to keep")
    parser.add_argument("--keep-run", metavar="DIR", help="keep deepseek-tf's run here")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args(argv)
    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras", "torch"]),
        "minutes": args.minutes,
        "goal": GOAL,
    }
    if args.ablate:
        result["ablations"] = ablate(args)
        if args.rows_from:  # rows measured by an earlier invocation (same machine)
            earlier = json.loads(Path(args.rows_from).read_text())["ablations"]
            merged = {k: result["ablations"].get(k) or earlier.get(k) for k in ABLATIONS}
            result["ablations"] = {k: v for k, v in merged.items() if v}
        bc.write_json(args.out.replace(".json", "_ablations.json"), result)  # before the peak
        result["matmul_peak"] = flops.matmul_peak()
        bc.write_json(args.out.replace(".json", "_ablations.json"), result)
        ablation_table(result["ablations"], args.ablation_minutes, result["matmul_peak"])
        return 0
    if not args.skip_peer and bc.module_missing("torch"):
        import_torch()  # the install hint now, not after an hour of training
    if not args.skip_ours:
        with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
            bc.maybe_wait_quiet("ours", args.wait_quiet)
            run_dir = Path(args.keep_run) if args.keep_run else Path(tmp) / "run"
            result["ours"] = run_ours(run_dir, [time_limit_override(args.minutes)])
            result["ours"]["saved_eval"] = eval_saved(run_dir)
    if not args.skip_peer:  # in the same invocation: a peer from another day compares days
        bc.maybe_wait_quiet("peer", args.wait_quiet)
        minutes = args.peer_minutes or args.minutes
        shaped = args.peer_recipe == "preset"
        result["peer"] = run_peer_for(60 * minutes, PRESET_SHAPED if shaped else GPU,
                                      60 * args.peer_eval_minutes,
                                      speed=parse_speed(args.peer_speed),
                                      fit=fitted(minutes) if shaped else None)  # fmt: skip
        result["peer"]["recipe_name"] = args.peer_recipe
        bf16 = "bf16" in result["peer"]["speed"]
        result["peer"]["precision"] = "bfloat16 autocast" if bf16 else "float32"
    if result.get("peer"):
        result["peer"]["flops_per_token"] = peer_flops_per_token(result["peer"]["recipe"])
    result["matmul_peak"] = flops.matmul_peak()  # last: the timed runs go first
    path = bc.write_json(args.out, result)
    png = path.with_suffix(".png")
    plot(result, png)
    report(result)
    print(f"result: {os.path.relpath(path)}, plot: {os.path.relpath(png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
