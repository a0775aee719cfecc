"""Compression table: every `deepseek-tf compress` method on one trained Shakespeare model.

Trains the `shakespeare-char` preset (2000 steps; or reuses `--run DIR`), then
builds each row from the trained weights with the library functions the CLI
uses, in one process:

    baseline | int8 PTQ | int4 PTQ | GPTQ int4 | QAT int8 | float fine-tune (control:
    QAT's extra steps without fake-quant) | pruned 30% / 50% | student from scratch |
    distilled student (half the layers) | low-rank

Columns: parameters (unique weights), weights on disk (a weights-only checkpoint
written by `compress.run_io.write_run`, as every compressed run is), validation
loss over the whole validation split, generation tokens/s (KV-cached `Generator`,
batch 8, 48 new tokens, greedy; median of rounds, every model visited once per
round so a slow spell of the shared machine hits all alike), forward tokens/s
(XLA forward of a (32, 64) batch; same interleaving), and the wall time of the
compression step itself. Goals (issue 6): int8 within +0.02 validation loss;
QAT int8 closer than int4 PTQ; pruned-30% within +0.05 and faster; the
distilled student beats the same student trained from scratch for the same steps.

With `--preset shakespeare-moe` the rows are the routed experts' weight-only codes
instead (baseline | int8 experts | int4 experts per channel | int4 experts, groups of
32 | int8 attention+ffn+experts | int4 attention+ffn+experts, groups of 32); goals
(issue 13): int8 experts within +0.01 validation loss, int4 within +0.05.

Usage:
    python benchmarks/compression.py                  # ~10 min on 2 cores
    python benchmarks/compression.py --preset shakespeare-moe   # ~5 min
    python benchmarks/compression.py --run runs/shakespeare-char --finetune-steps 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import bench_common as bc

NAME = "compression"


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def baseline_run(args) -> Path:
    from deepseek_tf.api import train
    from deepseek_tf.config.loader import load_config

    if args.run:
        return Path(args.run)
    run = Path(tempfile.mkdtemp(prefix="bench-compress-")) / "baseline"
    config = load_config(args.preset, overrides=[f"train.steps={args.train_steps}"])
    print(f"[train] {args.preset}, {args.train_steps} steps -> {run}", flush=True)
    train(config, out=run, verbose=0, sample_tokens=0)
    return run


def build_rows(run: Path, args) -> list[dict]:
    """Each row: name, config, model, seconds (compression wall time), notes."""
    from deepseek_tf.api import load
    from deepseek_tf.compress.distillation import distill_model, student_config_for
    from deepseek_tf.compress.low_rank import factorize
    from deepseek_tf.compress.pruning import prune_model
    from deepseek_tf.compress.quantization import calibration_tokens, quantize_model
    from deepseek_tf.compress.quantization_aware import quantization_aware_finetune
    from deepseek_tf.config.loader import update_config
    from deepseek_tf.rundir import RunDir

    config = RunDir(run).read_config()
    quiet = None

    def fresh():
        return load(run)[0]

    model, tokenizer = load(run)
    rows = [{"name": "baseline (float32)", "config": config, "model": model, "seconds": 0.0}]

    def ptq(name, mode, group=-1):
        m = fresh()
        dataset = calibration_tokens(config, tokenizer, 128) if mode == "gptq" else None

        def work():
            quantize_model(
                m,
                config.model,
                mode,
                include=("attention", "ffn"),
                bits=4,
                group_size=group,
                dataset=dataset,
            )

        _, seconds = timed(work)
        changes = {"quantize": mode, "quantize_bits": 4, "quantize_group_size": group}
        cfg = update_config(config, compression=changes)
        rows.append({"name": name, "config": cfg, "model": m, "seconds": seconds})

    print("[rows] post-training quantisation", flush=True)
    ptq("int8 PTQ", "int8")
    ptq("int4 PTQ", "int4")
    ptq("GPTQ int4 (g128, 128 seq)", "gptq", group=128)

    print(f"[rows] QAT int8, {args.finetune_steps} steps", flush=True)
    (cfg, m, _), seconds = timed(
        lambda: quantization_aware_finetune(
            fresh(), config, tokenizer, steps=args.finetune_steps, learning_rate=1e-4, log=quiet
        )
    )
    rows.append(
        {
            "name": f"QAT int8 ({args.finetune_steps} steps)",
            "config": cfg,
            "model": m,
            "seconds": seconds,
        }
    )

    print(f"[rows] float fine-tune control, {args.finetune_steps} steps", flush=True)

    def control():
        from deepseek_tf.compress.finetune import finetune

        m = fresh()
        finetune(m, config, tokenizer, steps=args.finetune_steps, learning_rate=1e-4, log=quiet)
        return m

    m, seconds = timed(control)
    rows.append(
        {
            "name": f"float fine-tuned ({args.finetune_steps} steps, control)",
            "config": config,
            "model": m,
            "seconds": seconds,
        }
    )

    for sparsity in (0.3, 0.5):
        print(f"[rows] prune {sparsity:.0%}, {args.finetune_steps} steps", flush=True)
        (cfg, m, _), seconds = timed(
            lambda s=sparsity: prune_model(
                fresh(),
                config,
                tokenizer,
                sparsity=s,
                targets=("heads", "ffn"),
                importance="gradient",
                steps=args.finetune_steps,
                learning_rate=3e-4,
                schedule_power=3.0,
                log=quiet,
            )
        )
        rows.append(
            {
                "name": f"pruned {sparsity:.0%} (heads+ffn)",
                "config": cfg,
                "model": m,
                "seconds": seconds,
            }
        )

    student_cfg = student_config_for(
        config, preset="shakespeare-char", overrides=["model.n_layers=2"], steps=args.train_steps
    )
    for alpha, label in ((0.0, "student from scratch"), (args.alpha, "distilled student")):
        print(f"[rows] {label} (2 layers, alpha={alpha}), {args.train_steps} steps", flush=True)
        m, seconds = timed(
            lambda a=alpha: distill_model(
                model,
                config,
                tokenizer,
                student_cfg,
                alpha=a,
                temperature=2.0,
                steps=args.train_steps,
                log=quiet,
            )
        )
        rows.append(
            {
                "name": f"{label} (2 layers)",
                "config": update_config(student_cfg, model={"vocab_size": model.vocab_size}),
                "model": m,
                "seconds": seconds,
            }
        )

    print(f"[rows] low-rank ffn rank {args.rank} + {args.finetune_steps} steps", flush=True)

    def lowrank():
        from deepseek_tf.compress.finetune import finetune

        cfg, m, _ = factorize(fresh(), config, targets=("ffn",), rank=args.rank)
        finetune(m, cfg, tokenizer, steps=args.finetune_steps, learning_rate=3e-4, log=quiet)
        return cfg, m

    (cfg, m), seconds = timed(lowrank)
    rows.append(
        {"name": f"low-rank ffn r={args.rank}", "config": cfg, "model": m, "seconds": seconds}
    )
    return rows, tokenizer


def expert_rows(run: Path, args) -> list[dict]:
    """MoE rows: the routed experts as int8 / int4 codes (`compress quantize`)."""
    from deepseek_tf.api import load
    from deepseek_tf.compress.quantization import quantize_model
    from deepseek_tf.config.loader import update_config
    from deepseek_tf.rundir import RunDir

    config = RunDir(run).read_config()
    model, tokenizer = load(run)
    rows = [{"name": "baseline (float32)", "config": config, "model": model, "seconds": 0.0}]
    variants = [
        ("int8 experts", "int8", ("experts",), -1),
        ("int4 experts (per channel)", "int4", ("experts",), -1),
        ("int4 experts (groups of 32)", "int4", ("experts",), 32),
        ("int8 attention+ffn+experts", "int8", ("attention", "ffn", "experts"), -1),
        # what `convert --quantize int4 --group-size 32` stores (this model's head is tied)
        ("int4 attention+ffn+experts (g32)", "int4", ("attention", "ffn", "experts"), 32),
    ]
    for name, mode, include, group in variants:
        print(f"[rows] {name}", flush=True)
        m = load(run)[0]
        _, seconds = timed(
            lambda m=m, mode=mode, include=include, group=group: quantize_model(
                m, config.model, mode, include=include, bits=4, group_size=group
            )
        )
        changes = {"quantize": mode, "quantize_include": include, "quantize_group_size": group}
        cfg = update_config(config, compression=changes)
        rows.append({"name": name, "config": cfg, "model": m, "seconds": seconds})
    return rows, tokenizer


def measure(rows, tokenizer, run: Path, args) -> None:
    """Fills parameters, bytes on disk and validation loss, then the interleaved speeds."""
    import numpy as np
    import tensorflow as tf

    from deepseek_tf.compress.finetune import validation_loss
    from deepseek_tf.compress.run_io import count_parameters, directory_bytes, write_run
    from deepseek_tf.generation.generate import Generator

    scratch = Path(tempfile.mkdtemp(prefix="bench-compress-rows-"))
    prompt = tokenizer.encode("ROMEO:\n")
    batch = np.random.RandomState(0).randint(0, tokenizer.vocab_size, (32, 64)).astype("int32")
    calls = {}
    for i, row in enumerate(rows):
        model = row["model"]
        row["parameters"] = count_parameters(model)
        out = write_run(
            scratch / f"row{i}", row["config"], tokenizer, model, run, {"method": row["name"]}
        )
        row["bytes"] = directory_bytes(out)
        row["val_loss"] = validation_loss(model, row["config"], tokenizer)
        gen = Generator(model)
        forward = tf.function(lambda ids, m=model: m(ids), jit_compile=True)

        def generate(g=gen):
            g.generate([prompt] * 8, max_new_tokens=args.new_tokens)

        generate()
        forward(batch)  # compile
        calls[row["name"]] = (generate, lambda f=forward: f(batch).numpy())
        print(f"[measure] {row['name']}: val loss {row['val_loss']:.4f}", flush=True)
    gen_s = {name: [] for name in calls}
    fwd_s = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, (generate, forward) in calls.items():
            gen_s[name].append(timed(generate)[1])
            fwd_s[name].append(min(timed(forward)[1] for _ in range(3)))
    for row in rows:
        row["generate_tokens_per_sec"] = 8 * args.new_tokens / bc.median(gen_s[row["name"]])
        row["forward_tokens_per_sec"] = batch.size / bc.median(fwd_s[row["name"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="an already trained run (of --preset) to compress")
    parser.add_argument(
        "--preset",
        default="shakespeare-char",
        choices=("shakespeare-char", "shakespeare-moe"),
        help="shakespeare-moe: the routed-expert quantization rows",
    )
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation weight")
    parser.add_argument("--rank", type=int, default=32, help="low-rank ffn rank")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    moe = args.preset == "shakespeare-moe"
    args.out = args.out or bc.default_out(NAME + ("_moe" if moe else ""))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    info = bc.machine_info(("tensorflow", "keras"))
    run = baseline_run(args)
    rows, tokenizer = (expert_rows if moe else build_rows)(run, args)
    measure(rows, tokenizer, run, args)
    base = rows[0]
    table = []
    for row in rows:
        table.append(
            [
                row["name"],
                f"{row['parameters']:,}",
                f"{row['bytes'] / 1024:.0f} KiB",
                f"{row['val_loss']:.4f}",
                f"{row['val_loss'] - base['val_loss']:+.4f}",
                f"{row['generate_tokens_per_sec']:,.0f}",
                f"{row['forward_tokens_per_sec']:,.0f}",
                f"{row['seconds']:.1f}",
            ]
        )
    bc.print_machine(info)
    bc.print_table(
        [
            "method",
            "params",
            "on disk",
            "val loss",
            "vs base",
            "gen tok/s",
            "fwd tok/s",
            "compress s",
        ],
        table,
    )
    keep = (
        "name",
        "parameters",
        "bytes",
        "val_loss",
        "generate_tokens_per_sec",
        "forward_tokens_per_sec",
        "seconds",
    )
    result = {
        "machine": info,
        "args": vars(args),
        "source_run": str(run),
        "rows": [{k: r[k] for k in keep} for r in rows],
    }
    print(f"results -> {bc.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
