"""nanoGPT's CPU "baby GPT" recipe on tiny Shakespeare: deepseek-tf against PyTorch.

Both sides run in this one invocation, one after the other (never at the same time):

1. ours: `deepseek-tf train --preset shakespeare-char --out DIR --sample-tokens 0` as a
   subprocess. Read back from DIR/metrics.jsonl: the last validation loss (whole
   validation split), the train tokens/s of the summary line (first, compiled step and
   evaluation excluded) and the wall time of the whole command.
2. peer: nanoGPT's GPT (model.py) re-written here in PyTorch from its description --
   learned position embeddings, pre-LayerNorm blocks without biases, causal attention
   through F.scaled_dot_product_attention, 4x GELU MLP, tied embeddings, dropout 0 --
   trained with nanoGPT's train.py recipe: AdamW(0.9, 0.99), weight decay 0.1 on 2-D
   parameters only, lr 1e-3 with 100 warm-up iterations and cosine decay to 1e-4 at
   iteration 2000, global-norm clipping at 1.0, batches of 12 random 64-token windows
   of the first 90% of the corpus. Its training iterations are timed (evaluation
   excluded), and its final model is evaluated on the same non-overlapping 64-token
   blocks of the last 10% that deepseek-tf evaluates, plus nanoGPT's own estimate
   (mean loss of 200 random batches).

Usage:
    python benchmarks/shakespeare_char.py                # full run, ~3 min on 2 cores
    python benchmarks/shakespeare_char.py --steps 50     # smoke run of both sides
    python benchmarks/shakespeare_char.py --skip-peer    # deepseek-tf only

PyTorch is a benchmark-only dependency: `pip install -e .[bench]` (or
`pip install torch==2.13.0`, the CPU wheel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc
from nanogpt_peer import BABY, GPU, import_torch, run_peer
from peer_speed import add_speed_arg, parse_speed

NAME = "shakespeare_char"
PRESET = "shakespeare-char"
TARGET_VAL_LOSS = 1.88  # nanoGPT README, baby GPT on CPU
SPEED_GOALS = {"baby": 2.0, "gpu": 1.5}  # ours / nanoGPT train tokens/s
RECIPES = {"baby": BABY, "gpu": GPU}
# --recipe gpu: nanoGPT's GPU recipe shape (6 x 384, context 256, batch 64, dropout 0.2,
# AdamW), on deepseek-tf's fastest CPU path (mixed_bfloat16 through oneDNN, no XLA)
GPU_OVERRIDES = [
    "model.d_model=384", "model.n_layers=6", "model.n_heads=6", "model.ffn_dim=1024",
    "model.max_seq_len=256", "data.seq_len=256", "train.batch_size=64", "model.dropout=0.2",
    "train.precision=mixed_bfloat16", "runtime.jit_compile=false",
]  # fmt: skip


# --------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------
def cli_command() -> list[str]:
    exe = Path(sys.executable).parent / "deepseek-tf"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("deepseek-tf")
    if found:
        return [found]
    return [sys.executable, "-m", "deepseek_tf.cli.main"]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def run_ours(steps: int, run_dir: Path, recipe: str = "baby") -> dict:
    cmd = [*cli_command(), "train", "--preset", PRESET, "--out", str(run_dir)]
    cmd += ["--sample-tokens", "0"]
    if steps != 2000:
        cmd += ["--set", f"train.steps={steps}"]
    for item in GPU_OVERRIDES if recipe == "gpu" else ():
        cmd += ["--set", item]
    printable = " ".join(cmd)
    print(f"[ours] {printable}", flush=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    load_before = bc.load_average()
    started = time.perf_counter()
    with bc.CpuMeter() as meter, log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(log_text.splitlines()[-30:])
        sys.exit(f"[ours] deepseek-tf train failed (exit {proc.returncode}):\n{tail}")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    summary = [m for m in metrics if m.get("event") == "summary"]
    vals = [m for m in metrics if "val_loss" in m]
    if not summary or not vals:
        sys.exit(f"[ours] {run_dir}/metrics.jsonl has no summary or no val_loss line")
    summary = summary[-1]
    params = re.search(r"params ([\d,]+)", log_text)
    last_train = [m for m in metrics if "loss" in m and "step" in m]
    # one-step throughput at each log line (time between consecutive batch ends, so it
    # includes the loop's own overhead); the median shrugs off evaluation steps and
    # short bursts of contention
    step_rates = [m["tokens_per_sec"] for m in last_train if m.get("step", 0) > 1]
    result = {
        "command": printable,
        "steps": summary["step"],
        "val_loss": vals[-1]["val_loss"],
        "val_loss_step": vals[-1]["step"],
        "val_curve": {str(m["step"]): m["val_loss"] for m in vals},
        "final_train_loss": last_train[-1]["loss"] if last_train else None,
        "train_tokens_per_sec": summary["train_tokens_per_sec"],
        "train_seconds": summary["train_seconds"],
        "timed_steps": summary["step"] - 1,  # the first (compiled) step is excluded
        "median_step_tokens_per_sec": bc.median(step_rates) if step_rates else None,
        "wall_seconds": wall,
        "cpu": meter.result,
        "params": int(params.group(1).replace(",", "")) if params else None,
        "load_average_before": load_before,
        "load_average_after": bc.load_average(),
    }
    print(
        f"[ours] val loss {result['val_loss']:.4f}, {result['train_tokens_per_sec']:.0f} "
        f"tokens/s, wall {wall:.1f} s",
        flush=True,
    )
    return result


def report(result: dict) -> None:
    ours, peer = result.get("ours"), result.get("peer")
    print()
    print(
        f"nanoGPT baby GPT on tiny Shakespeare: {result['steps']} steps, batch "
        f"{RECIPES[result['recipe']].batch_size} x {RECIPES[result['recipe']].block_size} tokens"
    )
    bc.print_machine(result["machine"])
    rows = []
    peer_label = f"nanoGPT (PyTorch, {peer.get('speed', 'eager-fp32')})" if peer else ""
    for label, r in (("deepseek-tf", ours), (peer_label, peer)):
        if r is None:
            continue
        est = r.get("nanogpt_estimate", {}).get("val")
        rows.append(
            [
                label,
                f"{r['params']:,}" if r.get("params") else "-",
                bc.fmt(r["val_loss"], ".4f"),
                bc.fmt(est, ".4f"),
                bc.fmt(r["train_tokens_per_sec"], ".0f"),
                bc.fmt(r.get("median_step_tokens_per_sec"), ".0f"),
                bc.fmt(r["train_seconds"], ".1f"),
                bc.fmt(r["wall_seconds"], ".1f"),
                bc.fmt(r["cpu"]["others_cpu_share"], ".0%"),
            ]
        )
    headers = ["", "params", "val loss", "200-batch est.", "train tok/s", "median step tok/s"]
    bc.print_table([*headers, "train s", "wall s", "others' CPU"], rows)
    if ours is not None:
        verdict = "meets" if ours["val_loss"] <= TARGET_VAL_LOSS else "misses"
        short = result["steps"] != 2000 or result["recipe"] != "baby"
        note = " (short run: not comparable)" if short else ""
        print(
            f"deepseek-tf val loss {ours['val_loss']:.4f} {verdict} the {TARGET_VAL_LOSS} "
            f"target{note}"
        )
    ratios = result["ratios"]
    speed = ratios.get("train_tokens_per_sec")
    if speed is not None:
        goal = SPEED_GOALS[result["recipe"]]
        verdict = "meets" if speed >= goal else "misses"
        median = bc.fmt(ratios.get("median_step_tokens_per_sec"), ".2f")
        wall = bc.fmt(ratios.get("wall_peer_over_ours"), ".2f")
        print(
            f"train tokens/s, deepseek-tf / nanoGPT: {speed:.2f}x ({verdict} the goal of "
            f">= {goal}x); median step: {median}x; wall time, nanoGPT / deepseek-tf: "
            f"{wall}x"
        )
    for label, r in (("deepseek-tf's run", ours), ("the nanoGPT run", peer)):
        note = bc.contention_note(label, r and r["cpu"])
        if note:
            print(note)
    print(
        "train tok/s: training steps only (deepseek-tf: first, compiled step excluded); "
        "wall s: deepseek-tf's whole command (start-up, compile, evaluations, checkpoints) "
        "vs the peer's data, training and full-split evaluations in this process"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps of both sides")
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="baby",
        help="baby: nanoGPT's CPU recipe (the default); gpu: its GPU recipe's shape "
        "(6 x 384, context 256, batch 64) for a throughput comparison (use --steps 20)",
    )
    parser.add_argument("--skip-peer", action="store_true", help="run deepseek-tf only")
    parser.add_argument("--skip-ours", action="store_true", help="run the PyTorch peer only")
    add_speed_arg(parser)
    parser.add_argument("--out", help="result JSON path (default: results/NAME[_gpu].json)")
    bc.add_wait_quiet_arg(parser)
    parser.add_argument(
        "--keep-run", metavar="DIR", help="keep deepseek-tf's run directory here (must be new)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.skip_peer and args.skip_ours:
        parser.error("nothing to run")
    if not args.skip_peer and bc.module_missing("torch"):
        import_torch()  # exits with the install hint now, not after minutes of training
    if args.keep_run and Path(args.keep_run).exists():
        parser.error(f"--keep-run {args.keep_run} already exists")

    result = {
        "benchmark": NAME,
        "steps": args.steps,
        "machine": bc.machine_info(["tensorflow", "keras", "torch"]),
        "recipe": args.recipe,
        "targets": {
            "val_loss": TARGET_VAL_LOSS,
            "train_tokens_per_sec_ratio": SPEED_GOALS[args.recipe],
        },
        "ours": None,
        "peer": None,
        "ratios": {},
    }
    if not args.skip_ours:
        with tempfile.TemporaryDirectory(prefix="bench-shakespeare-") as tmp:
            run_dir = Path(tmp) / "run"
            quiet = bc.maybe_wait_quiet("ours", args.wait_quiet)
            result["ours"] = run_ours(args.steps, run_dir, args.recipe)
            result["ours"]["wait_quiet"] = quiet
            if args.keep_run:
                shutil.copytree(tmp, args.keep_run)
    if not args.skip_peer:
        quiet = bc.maybe_wait_quiet("peer", args.wait_quiet)
        recipe = RECIPES[args.recipe]
        result["peer"] = run_peer(args.steps, recipe, estimate=args.recipe == "baby",
                                  speed=parse_speed(args.peer_speed))  # fmt: skip
        result["peer"]["wait_quiet"] = quiet
    ours, peer = result["ours"], result["peer"]
    if ours and peer:
        result["ratios"] = {
            "train_tokens_per_sec": bc.ratio(
                ours["train_tokens_per_sec"], peer["train_tokens_per_sec"]
            ),
            "median_step_tokens_per_sec": bc.ratio(
                ours["median_step_tokens_per_sec"], peer["median_step_tokens_per_sec"]
            ),
            "wall_peer_over_ours": bc.ratio(peer["wall_seconds"], ours["wall_seconds"]),
            "val_loss_ours_minus_peer": ours["val_loss"] - peer["val_loss"],
        }
    suffix = "" if args.recipe == "baby" else f"_{args.recipe}"
    path = bc.write_json(args.out or bc.default_out(NAME + suffix), result)
    report(result)
    print(f"result: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
