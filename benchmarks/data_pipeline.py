"""Corpora larger than memory: `data prepare` and the streaming input pipeline.

1. A corpus of `--gb` gigabytes is generated (tiny Shakespeare's lines in a seeded
   random order, written line by line: the generator holds one line).
2. `deepseek-tf data prepare --tokenizer char` tokenizes it into shards, as a
   subprocess whose peak RSS is measured (the goal: bounded, far below the corpus).
3. `deepseek-tf train --set data.prepared=DIR` trains `--steps` steps of the
   `shakespeare-char` preset from the shards (peak RSS goal: under 2 GB) and reports its
   training tokens/s.
4. The input pipeline alone (`make_train_dataset` of the same config, iterated without
   a model) is timed over `--pipeline-batches` batches: tokens/s, goal >= 10x the
   trainer's.

Usage:
    python benchmarks/data_pipeline.py                 # 5 GB (~20+ min on 2 cores)
    python benchmarks/data_pipeline.py --gb 0.05       # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc
from shakespeare_char import cli_command, read_metrics

NAME = "data_pipeline"
RSS_GOAL_MB = 2048
SPEED_GOAL = 10.0

PIPELINE_SCRIPT = r"""
import json, sys, time
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.data.pipeline import make_train_dataset
from deepseek_tf.tokenizers import load_tokenizer_path
prepared, batches = sys.argv[1], int(sys.argv[2])
config = apply_overrides(load_config("shakespeare-char"), [f"data.prepared={prepared}"])
ds = make_train_dataset(config.data, load_tokenizer_path(prepared), config.train.batch_size)
it = iter(ds)
next(it)  # the shuffle buffer fills
started = time.perf_counter()
for _ in range(batches):
    inputs = next(it)[0]
seconds = time.perf_counter() - started
tokens = batches * int(inputs.shape[0]) * int(inputs.shape[1])
print(json.dumps({"tokens_per_sec": tokens / seconds, "batches": batches, "seconds": seconds}))
"""


def generate(path: Path, gigabytes: float, seed: int = 0) -> int:
    lines = bc.corpus_path().read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    target, written = int(gigabytes * 1e9), 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            line = rng.choice(lines)
            f.write(line)
            written += len(line.encode("utf-8"))
    return written


def timed(cmd: list[str], log: Path) -> dict:
    """Runs `cmd`; its wall time and peak RSS (GNU time's maximum resident set size)."""
    wrapped = ["/usr/bin/time", "-f", "%M", *cmd] if Path("/usr/bin/time").exists() else cmd
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(wrapped, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace").strip().splitlines()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n" + "\n".join(text[-20:]))
    peak = int(text[-1]) / 1024 if wrapped is not cmd and text[-1].isdigit() else None
    return {"wall_seconds": wall, "peak_rss_mb": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=5.0, help="generated corpus size")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--pipeline-batches", type=int, default=2000)
    parser.add_argument("--workdir", help="keep the corpus and shards here (default: temp)")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    args = parser.parse_args(argv)
    result = {"benchmark": NAME, "machine": bc.machine_info(["tensorflow"]), "gb": args.gb}
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        started = time.perf_counter()
        result["corpus_bytes"] = generate(corpus, args.gb)
        result["generate_seconds"] = time.perf_counter() - started
        print(f"[data] corpus {result['corpus_bytes'] / 1e9:.2f} GB", flush=True)
        prepared = tmp / "prepared"
        prep = [*cli_command(), "data", "prepare", "--files", str(corpus), "--out", str(prepared)]
        result["prepare"] = timed(prep, tmp / "prepare.log")
        manifest = json.loads((prepared / "manifest.json").read_text())
        result["prepare"]["tokens"] = sum(s["tokens"] for s in manifest["splits"].values())
        print(f"[data] prepare {result['prepare']}", flush=True)
        run = tmp / "run"
        train = [*cli_command(), "train", "--preset", "shakespeare-char", "--out", str(run),
                 "--sample-tokens", "0", "--set", f"data.prepared={prepared}",
                 "--set", f"train.steps={args.steps}", "--set", "train.eval_every=0",
                 "--set", "train.checkpoint_every=0"]  # fmt: skip
        result["train"] = timed(train, tmp / "train.log")
        summary = [m for m in read_metrics(run / "metrics.jsonl") if m.get("event") == "summary"]
        result["train"]["tokens_per_sec"] = summary[-1]["train_tokens_per_sec"]
        print(f"[data] train {result['train']}", flush=True)
        done = subprocess.run(
            [sys.executable, "-c", PIPELINE_SCRIPT, str(prepared), str(args.pipeline_batches)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result["pipeline"] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["pipeline"]["tokens_per_sec"] / result["train"]["tokens_per_sec"]
    result["pipeline_over_trainer"] = ratio
    bc.write_json(args.out, result)
    print()
    bc.print_machine(result["machine"])
    prep, train = result["prepare"], result["train"]
    rows = [
        ["prepare", f"{prep['wall_seconds']:.0f}", bc.fmt(prep["peak_rss_mb"], ".0f"),
         f"{prep['tokens'] / prep['wall_seconds']:,.0f}"],
        ["train", f"{train['wall_seconds']:.0f}", bc.fmt(train["peak_rss_mb"], ".0f"),
         f"{train['tokens_per_sec']:,.0f}"],
        ["input pipeline alone", f"{result['pipeline']['seconds']:.0f}", "-",
         f"{result['pipeline']['tokens_per_sec']:,.0f}"],
    ]  # fmt: skip
    bc.print_table(["", "wall s", "peak RSS MB", "tokens/s"], rows)
    rss = train["peak_rss_mb"]
    print(f"train peak RSS {bc.fmt(rss, '.0f')} MB (goal < {RSS_GOAL_MB}); input pipeline "
          f"{ratio:.1f}x the trainer's tokens/s (goal >= {SPEED_GOAL:g}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
