"""Throughput of 1 vs 2 training workers on one machine (MultiWorkerMirroredStrategy).

Trains the `shakespeare-char` preset for `--steps` steps with the same global batch
three ways, each a real `deepseek-tf train` process tree on 127.0.0.1:

1. one process, `one_device`, TensorFlow's default threads (all cores);
2. one process, `one_device`, 1 intra-op thread (what each worker below gets);
3. two worker processes, `multi_worker` (`TF_CONFIG` with two 127.0.0.1 ports), 1
   intra-op thread each, each worker computing half of the global batch, gradients
   all-reduced over gRPC every step.

Reported: the chief's training tokens/s (the run summary in `metrics.jsonl`, first
step excluded) and wall seconds. On a 2-core machine two workers share the cores one
process already uses, so this measures the all-reduce and coordination overhead, not
scaling; with one worker per machine (or per GPU) the same command scales out.

Usage:
    python benchmarks/multi_worker.py            # ~4 min on 2 cores
    python benchmarks/multi_worker.py --steps 300 --batch 24
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

NAME = "multi_worker"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def train_cmd(out: Path, args, strategy: str, threads: int) -> list[str]:
    cmd = [sys.executable, "-m", "deepseek_tf.cli.main", "train", "--preset", "shakespeare-char"]
    cmd += ["--out", str(out), "--sample-tokens", "0"]
    for key, value in (
        ("train.steps", args.steps),
        ("train.batch_size", args.batch),
        ("train.eval_every", 0),
        ("train.checkpoint_every", 0),
        ("runtime.strategy", strategy),
        ("runtime.intra_op_threads", threads),
    ):
        cmd += ["--set", f"{key}={value}"]
    return cmd


def summary(out: Path) -> dict:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if '"summary"' in x][-1]


def run_job(label: str, cmds_envs: list, out: Path, timeout: float) -> dict:
    print(f"[{label}] starting {len(cmds_envs)} process(es)", flush=True)
    started = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for cmd, env in cmds_envs
    ]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        if p.returncode:
            sys.exit(f"[{label}] failed ({p.returncode}):\n{err.decode()[-2000:]}")
    wall = time.perf_counter() - started
    s = summary(out)
    print(f"[{label}] {s['train_tokens_per_sec']:,.0f} tokens/s, wall {wall:.1f} s", flush=True)
    return {
        "tokens_per_sec": s["train_tokens_per_sec"],
        "wall_seconds": wall,
        "train_seconds": s["train_seconds"],
        "processes": len(cmds_envs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=12, help="global batch (even)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=bc.default_out(NAME))
    args = parser.parse_args()
    info = bc.machine_info(("tensorflow", "keras"))
    root = Path(tempfile.mkdtemp(prefix="bench-mw-"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    results = {}
    results["1 process, all threads"] = run_job(
        "1 process",
        [(train_cmd(root / "one", args, "one_device", 0), env)],
        root / "one",
        args.timeout,
    )
    results["1 process, 1 thread"] = run_job(
        "1 process, 1 thread",
        [(train_cmd(root / "one1", args, "one_device", 1), env)],
        root / "one1",
        args.timeout,
    )
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    jobs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        jobs.append(
            (
                train_cmd(root / "mw", args, "multi_worker", 1),
                dict(env, TF_CONFIG=json.dumps(tf_config)),
            )
        )
    results["2 workers, 1 thread each"] = run_job("2 workers", jobs, root / "mw", args.timeout)
    base = results["1 process, all threads"]["tokens_per_sec"]
    bc.print_machine(info)
    bc.print_table(
        ["setup", "tokens/s", "vs 1 process", "train s", "wall s"],
        [
            [
                name,
                f"{r['tokens_per_sec']:,.0f}",
                f"{r['tokens_per_sec'] / base:.2f}x",
                f"{r['train_seconds']:.1f}",
                f"{r['wall_seconds']:.1f}",
            ]
            for name, r in results.items()
        ],
    )
    out = bc.write_json(args.out, {"machine": info, "args": vars(args), "results": results})
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
