"""Uncertainty on `shakespeare-char`: calibration, the gaussian head, OOD detection, cost.

Trains (as `deepseek-tf train` does, 2,000 steps each) the `shakespeare-char` preset, its
gaussian-head variant (`model.head=gaussian`), a dropout-0.1 variant (for MC dropout) and
two more seeds (a 3-member deep ensemble), then measures on the validation split:

- calibration: ECE and NLL before and after temperature scaling (`deepseek-tf
  calibrate`: fitted on the first half of the validation blocks, measured on the second);
- the gaussian head against the categorical one: validation loss, ECE, OOD AUROC;
- out-of-distribution detection: AUROC of each sequence-level score (mean predictive
  entropy, mutual information, NLL per 64-token block) for Shakespeare's validation
  blocks against Python source (this interpreter's `argparse.py` and `textwrap.py`)
  and against other English prose (the CPython `LICENSE.txt`: legal prose), characters
  outside the 65-character vocabulary dropped;
- selective prediction: top-1 accuracy at 50% coverage against full coverage;
- cost: evaluation tokens/s of the gaussian head with S = 1, 8, 32 samples.

    python benchmarks/uncertainty.py            # ~15 min on 2 cores
    python benchmarks/uncertainty.py --steps 200 --max-batches 20   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import bench_common as bc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = {
    "categorical": [],
    "gaussian": ["model.head=gaussian", "model.head_samples=2"],
    "dropout": ["model.dropout=0.1"],
    "seed 1": ["train.seed=1", "data.seed=1"],
    "seed 2": ["train.seed=2", "data.seed=2"],
}


def ood_texts(scratch: Path, chars) -> dict[str, str]:
    """Python source and English legal prose from this interpreter, restricted to `chars`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = {
        "python": [stdlib / "argparse.py", stdlib / "textwrap.py"],
        "prose": [stdlib / "LICENSE.txt"],
    }
    out = {}
    known = set(chars)
    for name, paths in sources.items():
        text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
        path = scratch / f"{name}.txt"
        path.write_text("".join(c for c in text if c in known), encoding="utf-8")
        out[name] = str(path)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--max-batches", type=int, default=0, help="eval batches (0: all)")
    parser.add_argument("--out", default=bc.default_out("uncertainty"))
    parser.add_argument("--runs", help="directory for the trained runs (reused when already there)")
    args = parser.parse_args()
    info = bc.machine_info(["tensorflow", "keras", "tensorflow-probability"])
    bc.print_machine(info)

    from deepseek_tf.api import load, train
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.data.pipeline import make_eval_dataset
    from deepseek_tf.rundir import RunDir
    from deepseek_tf.uncertainty.calibrate import calibrate
    from deepseek_tf.uncertainty.evaluate import collect, ood_report, uncertainty_report
    from deepseek_tf.uncertainty.predictive import Predictor

    scratch = Path(args.runs or tempfile.mkdtemp(prefix="uncertainty-bench-"))
    print(f"[runs] {scratch}", flush=True)
    runs = {}
    for name, overrides in VARIANTS.items():
        config = load_config("shakespeare-char", overrides=[f"train.steps={args.steps}",
                                                            *overrides])  # fmt: skip
        run = scratch / name.replace(" ", "_")
        if not RunDir(run).exists():
            started = time.perf_counter()
            train(config, out=run, verbose=0, sample_tokens=0)
            print(f"[train] {name}: {time.perf_counter() - started:.0f} s", flush=True)
        runs[name] = run

    model, tokenizer = load(runs["categorical"])
    config = RunDir(runs["categorical"]).read_config()

    def data(files=None):
        split = "all" if files else "val"
        return make_eval_dataset(config.data, tokenizer, 32, files=files, split=split)

    texts = ood_texts(scratch, tokenizer.char_table)
    rows = {}

    def measure(name, predictor):
        collected = collect(predictor, data(), args.max_batches)
        summary = uncertainty_report(collected, predictor)
        summary.pop("curve")
        for kind, path in texts.items():
            other = collect(predictor, data([path]), args.max_batches)
            summary[f"ood_{kind}"] = ood_report(collected, other)
        rows[name] = summary
        print(f"[eval] {name}: nll {summary['nll']:.4f} ece {summary['ece']:.4f}", flush=True)

    models = {name: load(run)[0] for name, run in runs.items()}
    measure("categorical", Predictor(models["categorical"]))
    measure("gaussian head (S=8)", Predictor(models["gaussian"], samples=8))
    measure("MC dropout (S=8)", Predictor(models["dropout"], "mc_dropout", samples=8))
    members = [models["categorical"], models["seed 1"], models["seed 2"]]
    measure("deep ensemble (3)", Predictor(members, "ensemble"))

    calibrated = {}
    for name in ("categorical", "gaussian"):
        out = scratch / f"{name}-calibrated"
        shutil.rmtree(out, ignore_errors=True)
        calibrated[name] = calibrate(runs[name], out=out, samples=8)
        print(f"[calibrate] {name}: T x {calibrated[name]['temperature_factor']:.3f}", flush=True)

    cost = {}
    gaussian = models["gaussian"]
    for samples in (1, 8, 32):
        predictor = Predictor(gaussian, samples=samples)
        collect(predictor, data(), 1)  # compile
        started = time.perf_counter()
        done = collect(predictor, data(), args.max_batches or 40)
        cost[samples] = len(done["nll"]) / (time.perf_counter() - started)
        print(f"[cost] S={samples}: {cost[samples]:,.0f} tokens/s", flush=True)

    result = {"machine": info, "steps": args.steps, "rows": rows, "calibration": calibrated,
              "eval_tokens_per_sec": cost}  # fmt: skip
    bc.print_table(
        ["method", "NLL", "ECE", "Brier", "acc", "acc@50%", "MI", "OOD py (nll/ent/mi)",
         "OOD prose (nll/ent/mi)"],
        [
            [name, bc.fmt(r["nll"], ".4f"), bc.fmt(r["ece"], ".4f"), bc.fmt(r["brier"], ".4f"),
             bc.fmt(r["accuracy"], ".4f"), bc.fmt(r["accuracy_at_50_coverage"], ".4f"),
             bc.fmt(r["mutual_information"], ".4f"),
             "/".join(bc.fmt(r["ood_python"][f"auroc_{k}"], ".3f")
                      for k in ("nll", "entropy", "mutual_information")),
             "/".join(bc.fmt(r["ood_prose"][f"auroc_{k}"], ".3f")
                      for k in ("nll", "entropy", "mutual_information"))]
            for name, r in rows.items()
        ],
    )  # fmt: skip
    bc.print_table(
        ["calibrated run", "T factor", "NLL before", "NLL after", "ECE before", "ECE after"],
        [[name, bc.fmt(c["temperature_factor"], ".3f"), bc.fmt(c["held_out_nll_before"], ".4f"),
          bc.fmt(c["held_out_nll_after"], ".4f"), bc.fmt(c["held_out_ece_before"], ".4f"),
          bc.fmt(c["held_out_ece_after"], ".4f")] for name, c in calibrated.items()],
    )  # fmt: skip
    bc.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
