"""Federated training on `shakespeare-char`: FedAvg against centralised training, the
adaptive and proximal algorithms on very non-IID clients, DP, bytes and time per round,
and the Flower engine against the in-process one.

Every run uses the `shakespeare-char` model and client settings (batch 12 x 64 tokens,
AdamW at lr 1e-3, constant within a round), 16 clients, 8 sampled per round, 10 local
steps, and is measured on the clients' validation parts together:

1. FedAvg on `by-speaker` (one client per speaking role, the LEAF split) against
   `deepseek-tf train` on the same clients' training text for the same number of
   tokens (rounds x 8 x 10 steps of 768 tokens);
2. FedAvg, FedProx (mu 0.01) and FedAdam (server lr 0.01) on `dirichlet:0.1`;
3. FedAvg with client-level DP at epsilon <= 8 (delta 1e-5): the noise multiplier that
   reaches it in these rounds (from `dp-accounting`), clipping at the median update norm
   of the non-private run;
4. bytes sent and received per round, wall time per round;
5. the Flower simulation engine against the in-process engine on the same seeds
   (a few rounds; needs the `[federated]` extra).

    python benchmarks/federated.py                  # ~25 min on 2 cores
    python benchmarks/federated.py --rounds 3 --flower-rounds 2     # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

COMMON = [
    "federated.clients=16",
    "federated.clients_per_round=8",
    "federated.local_steps=10",
    "train.eval_every=0",
]


def noise_for_epsilon(target: float, rate: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose RDP epsilon after `rounds` is <= `target`."""
    from deepseek_tf.federated.privacy import DPConfig, epsilon

    lo, hi = 0.3, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        eps = epsilon(DPConfig(clip=1.0, noise_multiplier=mid, delta=delta), rate, rounds)
        lo, hi = (lo, mid) if eps["epsilon"] <= target else (mid, hi)
    return hi


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--flower-rounds", type=int, default=3)
    parser.add_argument("--out", default=bc.default_out("federated"))
    parser.add_argument(
        "--only",
        default="",
        help="run only the federated rows whose name contains this text, and merge them "
        "into the rows already in --out",
    )
    args = parser.parse_args()
    info = bc.machine_info(["tensorflow", "keras", "flwr", "dp-accounting"])
    bc.print_machine(info)

    import numpy as np

    from deepseek_tf.api import federated as train_federated
    from deepseek_tf.api import load, train
    from deepseek_tf.config.loader import apply_overrides, load_config
    from deepseek_tf.data.pipeline import make_eval_dataset
    from deepseek_tf.errors import TrainingError
    from deepseek_tf.rundir import RunDir
    from deepseek_tf.training.evaluate import evaluate

    scratch = Path(tempfile.mkdtemp(prefix="federated-bench-"))
    rounds_keys = [f"federated.rounds={args.rounds}", f"federated.eval_every={args.rounds}"]
    base = load_config("shakespeare-char", overrides=[*COMMON, *rounds_keys])
    rows = {}

    def federated(name, *overrides):
        if args.only and args.only not in name:
            return None, None
        run = scratch / name.replace(" ", "_").replace(":", "").replace("/", "_")
        started = time.perf_counter()
        stopped = None
        try:
            train_federated(apply_overrides(base, list(overrides)), out=run, verbose=0)
        except TrainingError as e:  # the engine stops a diverging run without saving it
            stopped = str(e)
        wall = time.perf_counter() - started
        rounds = [e for e in RunDir(run).metrics.read() if "round" in e and "event" not in e]
        last = rounds[-1] if rounds else {}
        rows[name] = {
            "val_loss": last.get("val_loss"),
            "worst_client_loss_last_round": last.get("worst_client_loss"),
            "bytes_sent_per_round": float(np.mean([r["bytes_sent"] for r in rounds])),
            "bytes_received_per_round": float(np.mean([r["bytes_received"] for r in rounds])),
            "seconds_per_round": float(np.mean([r["seconds"] for r in rounds])),
            "wall_seconds": round(wall, 1),
            "epsilon": last.get("epsilon"),
            "rounds_run": len(rounds),
            "stopped": stopped,
        }
        result = f"stopped: {stopped}" if stopped else f"val {rows[name]['val_loss']:.4f}"
        print(f"[{name}] {result}, {wall:.0f} s", flush=True)
        return run, rounds

    fedavg_run, fedavg_rounds = federated("FedAvg by-speaker", "federated.partition=by-speaker")
    # one client per round for 8x the local steps: the same tokens, made sequential again
    federated("FedAvg 1 client/round x 80 steps by-speaker", "federated.partition=by-speaker",
              "federated.clients_per_round=1", "federated.local_steps=80")  # fmt: skip
    if args.only:
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        previous.setdefault("rows", {})
        bc.write_json(args.out, {**previous, "rows": {**previous["rows"], **rows}})
        return 0

    # centralised: the same clients' training text, the same tokens
    clients = tuple(sorted(str(p) for p in (fedavg_run / "clients").glob("client_*.txt")))
    steps = args.rounds * 8 * 10
    central_cfg = apply_overrides(base, [f"train.steps={steps}", "train.warmup_steps=0",
                                         "train.min_learning_rate=0.001"])  # fmt: skip
    central_cfg = dataclasses.replace(
        central_cfg, data=dataclasses.replace(base.data, files=clients)
    )
    started = time.perf_counter()
    train(central_cfg, out=scratch / "central", verbose=0, sample_tokens=0)
    model, tokenizer = load(scratch / "central")
    val = make_eval_dataset(central_cfg.data, tokenizer, 12, split="val")
    rows["centralised (same tokens)"] = {
        "val_loss": evaluate(model, val)["loss"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"[centralised] val {rows['centralised (same tokens)']['val_loss']:.4f}", flush=True)

    # the same number of sequential updates as FedAvg (rounds x local steps) at one
    # client's batch: where FedAvg would be if averaging 8 clients bought nothing
    seq_cfg = apply_overrides(central_cfg, [f"train.steps={args.rounds * 10}"])
    train(seq_cfg, out=scratch / "central_seq", verbose=0, sample_tokens=0)
    model, _ = load(scratch / "central_seq")
    rows["centralised (same sequential steps)"] = {"val_loss": evaluate(model, val)["loss"]}

    for name, extra in (
        ("FedAvg dirichlet:0.1", ["federated.algorithm=fedavg"]),
        ("FedProx mu=0.01 dirichlet:0.1", ["federated.algorithm=fedprox:0.01"]),
        (
            "FedAdam dirichlet:0.1",
            ["federated.algorithm=fedadam", "federated.server_learning_rate=0.01"],
        ),
    ):
        federated(name, "federated.partition=dirichlet:0.1", *extra)  # fmt: skip

    # DP: clip at the median update norm of the non-private run's first round
    from deepseek_tf.federated.client import LocalTrainer

    trainer = LocalTrainer(RunDir(fedavg_run).read_config(), tokenizer)
    norms = [float(np.sqrt(sum(np.sum(u**2) for u in trainer.run(trainer.get_weights(), c, 0)
                                    ["update"]))) for c in clients[:8]]  # fmt: skip
    clip = float(np.median(norms))
    z = noise_for_epsilon(8.0, 8 / 16, args.rounds, 1e-5)
    federated("FedAvg + DP eps<=8 by-speaker", "federated.partition=by-speaker",
              f"federated.dp_clip={clip}", f"federated.dp_noise_multiplier={z}")  # fmt: skip
    # the noise on the average (z C / K per coordinate) against an update's RMS per
    # coordinate (C / sqrt(d)): how many times the signal the noise is
    d = sum(int(np.prod(w.shape)) for w in trainer.get_weights())
    rows["FedAvg + DP eps<=8 by-speaker"].update(
        clip=clip, noise_multiplier=z, noise_to_signal_per_coordinate=z * np.sqrt(d) / 8
    )

    flower = {}
    if not bc.module_missing("flwr"):
        short = [f"federated.rounds={args.flower_rounds}", "federated.partition=by-speaker",
                 f"federated.eval_every={args.flower_rounds}"]  # fmt: skip
        for engine in ("inprocess", "flower"):
            run = scratch / f"engine_{engine}"
            started = time.perf_counter()
            train_federated(apply_overrides(base, [*short, f"federated.engine={engine}"]),
                            out=run, verbose=0)  # fmt: skip
            rounds = [e for e in RunDir(run).metrics.read() if "round" in e and "event" not in e]
            flower[engine] = {"losses": [r["loss"] for r in rounds],
                              "val_loss": rounds[-1]["val_loss"],
                              "wall_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        flower["identical"] = flower["inprocess"]["losses"] == flower["flower"]["losses"]
        print(f"[engines] identical losses: {flower['identical']}", flush=True)

    bc.print_table(
        ["run", "val loss", "worst client (last round)", "MB sent/round", "MB recv/round",
         "s/round", "epsilon"],
        [[name, bc.fmt(r["val_loss"], ".4f"), bc.fmt(r.get("worst_client_loss_last_round"), ".4f"),
          bc.fmt(r.get("bytes_sent_per_round", 0) / 2**20, ".2f"),
          bc.fmt(r.get("bytes_received_per_round", 0) / 2**20, ".2f"),
          bc.fmt(r.get("seconds_per_round"), ".2f"), bc.fmt(r.get("epsilon"), ".2f")]
         for name, r in rows.items()],
    )  # fmt: skip
    if flower:
        print(
            f"engines: in-process {flower['inprocess']['wall_seconds']} s, flower "
            f"{flower['flower']['wall_seconds']} s, identical losses {flower['identical']}"
        )
    bc.write_json(args.out, {"machine": info, "rounds": args.rounds, "rows": rows,
                             "engines": flower, "fedavg_rounds": fedavg_rounds})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
