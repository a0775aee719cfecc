"""Progressive training (`train.stages`, the brief's "small first, then full") against the
flat schedule: wall-clock minutes to a validation loss.

One invocation trains the same preset twice, one run after the other (never at the same
time), each as a `deepseek-tf train` subprocess (`speedrun.run_ours`: start-up,
compilation, every evaluation and checkpoint count):

1. flat: the preset as it is;
2. staged: the preset with `train.stages` -- its first steps on shorter sequences, the
   rest on the preset's own -- and nothing else changed (the same steps, learning-rate
   schedule, model, data and seed).

Both validate every `--eval-every` steps on the whole validation split at the preset's
sequence length. The table gives the minutes each run took to reach each threshold, its
best validation loss and its wall time.

Usage:
    python benchmarks/progressive.py --wait-quiet 300            # shakespeare-char, ~6 min
    python benchmarks/progressive.py --preset shakespeare-speedrun --minutes 30
    python benchmarks/progressive.py --stages steps=500,seq_len=16,batch_size=48 steps=1500

Writes benchmarks/results/progressive.json (or progressive_<preset>.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import bench_common as bc
from speedrun import first_below, run_ours, time_limit_override

NAME = "progressive"
# per preset: the staged schedule (a quarter to a third of the steps at a quarter of the
# context, the batch grown so that a step holds the same tokens) and the thresholds
PRESETS = {
    "shakespeare-char": {
        "stages": ("steps=600,seq_len=16,batch_size=48", "steps=1400"),
        "thresholds": (2.2, 2.0, 1.9, 1.8),
        "eval_every": 100,
    },
    "shakespeare-speedrun": {
        "stages": ("steps=600,seq_len=64,batch_size=128", "steps=1600"),
        "thresholds": (1.60, 1.55, 1.50, 1.47),
        "eval_every": 100,
    },
}


def train_once(label: str, preset: str, overrides: list[str], minutes: float | None,
               wait_quiet: float) -> dict:  # fmt: skip
    bc.maybe_wait_quiet(label, wait_quiet)
    if minutes:
        overrides = [*overrides, time_limit_override(minutes)]
    with tempfile.TemporaryDirectory(prefix=f"progressive-{label}-") as tmp:
        run = run_ours(Path(tmp) / "run", overrides, preset=preset)
    note = bc.contention_note(label, run["cpu"])
    if note:
        print(note, flush=True)
    run["overrides"] = overrides
    return run


def report(result: dict) -> None:
    print()
    bc.print_machine(result["machine"])
    thresholds = result["settings"]["thresholds"]
    rows = []
    for label in ("flat", "staged"):
        run = result[label]
        times = [first_below(run["curve"], th) for th in thresholds]
        rows.append(
            [
                label,
                *(bc.fmt(t and t / 60, ".2f") for t in times),
                f"{run['best_val_loss']:.4f}",
                f"{run['steps']}",
                bc.fmt(run["wall_seconds"] / 60, ".2f"),
                bc.fmt(run["cpu"]["others_cpu_share"], ".0%"),
            ]
        )
    heads = [f"min to {th:.2f}" for th in thresholds]
    bc.print_table(["", *heads, "best val", "steps", "wall min", "others' CPU"], rows)
    print(f"stages: {' '.join(result['settings']['stages'])}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shakespeare-char", choices=sorted(PRESETS))
    parser.add_argument("--stages", nargs="+", help="train.stages of the staged run")
    parser.add_argument("--eval-every", type=int, help="validation interval (steps)")
    parser.add_argument("--minutes", type=float, help="wall-time limit of each run")
    parser.add_argument("--out", help="result JSON path")
    bc.add_wait_quiet_arg(parser)
    args = parser.parse_args(argv)
    defaults = PRESETS[args.preset]
    stages = args.stages or list(defaults["stages"])
    every = args.eval_every or defaults["eval_every"]
    common = [f"train.eval_every={every}"]
    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras"]),
        "settings": {
            "preset": args.preset,
            "stages": stages,
            "eval_every": every,
            "minutes": args.minutes,
            "thresholds": list(defaults["thresholds"]),
        },
    }
    staged = [*common, "train.stages=[" + ", ".join(f'"{s}"' for s in stages) + "]"]
    for label, overrides in (("flat", common), ("staged", staged)):
        result[label] = train_once(label, args.preset, overrides, args.minutes, args.wait_quiet)
    suffix = "" if args.preset == "shakespeare-char" else f"_{args.preset.split('-')[-1]}"
    out = args.out or bc.default_out(NAME + suffix)
    report(result)
    print(f"wrote {bc.write_json(out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
