"""Expert parallelism (`runtime.expert_parallel`) on logical CPU devices: exactness,
per-replica expert memory, throughput and the bytes the dispatch exchanges.

Each row is a fresh process with `--devices` logical CPU devices (MirroredStrategy):
`--model` trained `--steps` steps with the same global batch as one process (`EP -`,
the default strategy), with expert parallelism N = 1 (data parallel), 2 and 4.

Reported per row: the largest |loss - one process's loss| over all steps; training
tokens/s (the run summary, first step excluded); the routed-expert weights and Adam
moments one replica holds, summed over the variables placed on its device; and the
values the all-gather dispatcher moves per step (`exchanged_bytes`, from the shapes:
forward all-gather of tokens, ids and weights, all-reduce of the outputs, the same
again backward, per MoE layer).

On one 2-core machine the devices share the cores: tokens/s measures the overhead of
sharding, not scaling. The README models 64-way EP on a cluster from these volumes.

Usage:
    python benchmarks/expert_parallel.py              # ~6 min on 2 cores
    python benchmarks/expert_parallel.py --steps 6    # smoke run
    python benchmarks/expert_parallel.py --memory     # peak RSS, a 5 GB budget (~4 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import bench_common as bc

NAME = "expert_parallel"

ROW_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
devices, shards, steps, model = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
import tempfile
from pathlib import Path
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.api import train
from deepseek_tf.training.trainer import Trainer

kept = {}
run_trainer = Trainer.train


def keep_trainer(self):
    kept["trainer"] = self
    return run_trainer(self)


Trainer.train = keep_trainer

overrides = [f"train.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
             "train.log_every=1", "train.batch_size=8", "runtime.jit_compile=false"]
if shards:
    overrides += ["runtime.strategy=mirrored", f"runtime.expert_parallel={shards}"]
overrides += sys.argv[5:]  # the --memory rows' larger experts
config = apply_overrides(load_config(model), overrides)
summary = train(config, out=Path(tempfile.mkdtemp()) / "run", verbose=0, sample_tokens=0)
trainer = kept["trainer"]
entries = trainer.run.metrics.read()
losses = {e["step"]: e["loss"] for e in entries if "loss" in e and "event" not in e}
first = trainer.strategy.extended.worker_devices[0] if trainer.replicas > 1 else None


def on_first_replica(variable):
    parts = trainer.strategy.experimental_local_results(variable)
    return sum(int(np.prod(p.shape)) * p.dtype.size for p in parts if first in (None, p.device))


experts = [v.value for layer in trainer.model.moe_modules() for v in (
    getattr(layer, name) for name in ("experts_gate", "experts_up", "experts_down"))]
moments = []
if trainer.expert_update is not None:
    moments = [v.value for v in trainer.expert_update.optimizer.variables
               if v.value.synchronization == tf.VariableSynchronization.ON_READ]
else:
    opt = trainer.optimizer
    moments = [m.value for v in experts
               for m in (opt._momentums[opt._get_variable_index(v)],
                         opt._velocities[opt._get_variable_index(v)])]
m = config.model
layers = len(trainer.model.moe_modules())
n = config.train.batch_size * config.data.seq_len // max(trainer.replicas, 1)  # per replica
R, d, k = trainer.replicas, m.d_model, m.num_experts_per_tok
gathered = R * n * (d * 4 + k * 4 + k * 4)  # tokens (float32), ids, weights
reduced = R * n * d * 4  # outputs, float32
print("ROW", json.dumps({
    "losses": losses, "tokens_per_sec": summary["train_tokens_per_sec"],
    "replicas": trainer.replicas,
    "expert_weight_bytes": sum(on_first_replica(v) for v in experts),
    "expert_moment_bytes": sum(on_first_replica(v) for v in moments),
    "exchanged_bytes": 2 * layers * (gathered + reduced) if shards and shards > 1 else 0,
}))
"""


def run_row(devices: int, shards: int, steps: int, model: str, extra=(), budget=0) -> dict:
    """One configuration in a fresh process; with `extra` overrides also its peak RSS
    (GNU time's maximum resident set size); with `budget` (bytes) under that address-
    space limit (`prlimit --as`), returning `{"trains": False, "error": ...}` if it fails."""
    cmd = [sys.executable, "-c", ROW_SCRIPT, str(devices), str(shards), str(steps), model]
    if extra:
        cmd = ["/usr/bin/time", "-f", "PEAK %M", *cmd, *extra]
    if budget:
        cmd = ["prlimit", f"--as={budget}", *cmd]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode and budget:
        oom = [x for x in done.stderr.splitlines() if "OOM" in x or "MemoryError" in x]
        return {"trains": False, "error": (oom or done.stderr.splitlines()[-1:])[0].strip()}
    if done.returncode:
        sys.exit(f"row EP {shards} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.split("ROW ")[1].splitlines()[0])
    if extra:
        row["peak_rss_mb"] = int(done.stderr.split("PEAK ")[-1].split()[0]) / 1024
    return row


# --memory: tiny-moe with 16 experts of width 256 x 1024 in each of its 3 MoE layers
# (37.7M expert parameters: 151 MB of float32 weights, 302 MB of Adam moments per copy)
LARGE_EXPERTS = ["model.d_model=256", "model.moe_ffn_dim=1024", "model.n_routed_experts=16"]


def memory_rows(steps: int, budget_gb: float) -> dict:
    """Peak RSS of one process whose 2 replicas (logical devices) hold every expert
    (EP 1: two copies) or half each (EP 2: one copy in all), then whether each trains
    within a `budget_gb` address-space limit."""
    rows = {}
    for shards in (1, 2):
        row = run_row(2, shards, steps, "tiny-moe", LARGE_EXPERTS)
        row = {k: v for k, v in row.items() if k != "losses"}
        limited = run_row(2, shards, steps, "tiny-moe", LARGE_EXPERTS, int(budget_gb * 1e9))
        row["trains_within_budget"] = limited.get("trains", True)
        row["budget_error"] = limited.get("error")
        rows[f"EP {shards}"] = row
        print(f"[ep] memory EP {shards}: {json.dumps(row)}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--model", default="tiny-moe", help="preset (8 routed experts)")
    parser.add_argument("--memory", action="store_true", help="peak RSS rows only")
    parser.add_argument("--budget-gb", type=float, default=5.0, help="--memory's limit")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    args = parser.parse_args(argv)
    result = {"benchmark": NAME, "machine": bc.machine_info(["tensorflow"]), "rows": {}}
    if args.memory:
        result["memory"] = memory_rows(min(args.steps, 3), args.budget_gb)
        result["budget_gb"] = args.budget_gb
        bc.write_json(args.out.replace(".json", "_memory.json"), result)
        return 0
    reference = run_row(args.devices, 0, args.steps, args.model)  # one process
    result["rows"]["one process"] = reference
    for shards in (1, 2, 4):
        row = run_row(args.devices, shards, args.steps, args.model)
        row["max_loss_diff"] = max(
            abs(row["losses"][s] - reference["losses"][s]) for s in reference["losses"]
        )
        result["rows"][f"EP {shards}"] = row
        print(f"[ep] EP {shards}: {json.dumps({k: v for k, v in row.items() if k != 'losses'})}")
    bc.write_json(args.out, result)
    print()
    bc.print_machine(result["machine"])
    rows = []
    for name, row in result["rows"].items():
        rows.append([
            name, str(row["replicas"]), bc.fmt(row.get("max_loss_diff"), ".1e"),
            f"{row['tokens_per_sec']:,.0f}", f"{row['expert_weight_bytes'] / 1e3:,.1f}",
            f"{row['expert_moment_bytes'] / 1e3:,.1f}", f"{row['exchanged_bytes'] / 1e6:,.2f}",
        ])  # fmt: skip
    headers = ["", "replicas", "max |dloss|", "tokens/s", "expert kB/replica",
               "Adam kB/replica", "MB exchanged/step"]  # fmt: skip
    bc.print_table(headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
