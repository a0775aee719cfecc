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
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

NAME = "shakespeare_char"
PRESET = "shakespeare-char"
TARGET_VAL_LOSS = 1.88  # nanoGPT README, baby GPT on CPU
SPEED_GOAL = 1.5  # ours / nanoGPT train tokens/s

# nanoGPT baby GPT (config/train_shakespeare_char.py with the README's CPU overrides)
BATCH_SIZE = 12
BLOCK_SIZE = 64
N_LAYER = 4
N_HEAD = 4
N_EMBD = 128
BIAS = False
LEARNING_RATE = 1e-3
MIN_LR = 1e-4
WARMUP_ITERS = 100
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.99)
GRAD_CLIP = 1.0
VAL_FRACTION = 0.1
SEED = 1337
EVAL_ITERS = 200  # nanoGPT-style estimate: mean over this many random batches
EVAL_EVERY = 500  # peer's full-split evaluations, at the steps the preset evaluates
LOG_INTERVAL = 10  # nanoGPT reads loss.item() only every log_interval iterations


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


def run_ours(steps: int, run_dir: Path) -> dict:
    cmd = [*cli_command(), "train", "--preset", PRESET, "--out", str(run_dir)]
    cmd += ["--sample-tokens", "0"]
    if steps != 2000:
        cmd += ["--set", f"train.steps={steps}"]
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


# --------------------------------------------------------------------------------------
# peer: nanoGPT's GPT in PyTorch
# --------------------------------------------------------------------------------------
def import_torch():
    try:
        import torch
    except ImportError:
        sys.exit(
            "PyTorch is not installed: the nanoGPT peer needs it. Install the benchmark "
            "extras (`pip install -e .[bench]`, or `pip install torch==2.13.0` for the CPU "
            "wheel), or pass --skip-peer to run deepseek-tf alone."
        )
    return torch


def build_gpt(torch, vocab_size: int):
    """nanoGPT's GPT for the baby recipe (written from its description)."""
    nn = torch.nn
    F = torch.nn.functional

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=BIAS)  # q, k, v in one matmul
            self.c_proj = nn.Linear(N_EMBD, N_EMBD, bias=BIAS)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, c))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=BIAS)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=BIAS)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(N_EMBD, bias=BIAS)
            self.attn = SelfAttention()
            self.ln_2 = nn.LayerNorm(N_EMBD, bias=BIAS)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, N_EMBD)
            self.wpe = nn.Embedding(BLOCK_SIZE, N_EMBD)
            self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
            self.ln_f = nn.LayerNorm(N_EMBD, bias=BIAS)
            self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight  # weight tying
            for module in self.modules():
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            # residual projections: GPT-2's scaled initialisation
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * N_LAYER))

        def forward(self, idx):
            t = idx.shape[1]
            pos = torch.arange(t, dtype=torch.long, device=idx.device)
            x = self.wte(idx) + self.wpe(pos)  # dropout 0: no dropout layer
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x))  # (B, T, V)

    return GPT()


def make_optimizer(torch, model):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=BETAS)


def nanogpt_lr(it: int, decay_iters: int) -> float:
    """Linear warm-up, cosine decay to MIN_LR at `decay_iters`, then flat."""
    if it < WARMUP_ITERS:
        return LEARNING_RATE * (it + 1) / (WARMUP_ITERS + 1)
    if it > decay_iters:
        return MIN_LR
    ratio = (it - WARMUP_ITERS) / (decay_iters - WARMUP_ITERS)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return MIN_LR + coeff * (LEARNING_RATE - MIN_LR)


def load_char_data(torch):
    """nanoGPT's prepare.py: sorted characters as ids, first 90% train, rest val."""
    text = bc.corpus_path().read_bytes().decode("utf-8")  # no newline translation
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = len(data)
    split = int(n * (1.0 - VAL_FRACTION))
    if split != math.floor(n * 0.9):  # nanoGPT's int(n * 0.9), deepseek-tf's split_point
        raise RuntimeError("split arithmetic differs from nanoGPT's")
    return data[:split], data[split:], len(chars)


def get_batch(torch, data):
    """nanoGPT's get_batch: BATCH_SIZE windows at uniformly random offsets."""
    ix = torch.randint(len(data) - BLOCK_SIZE, (BATCH_SIZE,))
    index = ix[:, None] + torch.arange(BLOCK_SIZE)[None, :]
    return data[index], data[index + 1]


def full_split_loss(torch, model, data, batch: int = 128) -> float:
    """Mean token loss over non-overlapping (BLOCK_SIZE + 1)-token blocks from offset 0,
    the last partial block dropped: exactly what deepseek-tf's eval dataset covers."""
    F = torch.nn.functional
    n = len(data) // (BLOCK_SIZE + 1) * (BLOCK_SIZE + 1)
    blocks = data[:n].view(-1, BLOCK_SIZE + 1)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            b = blocks[i : i + batch]
            x, y = b[:, :-1], b[:, 1:]
            logits = model(x)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += y.numel()
    model.train()
    return total / count


def estimate_loss(torch, model, data) -> float:
    """nanoGPT's estimate_loss for one split: mean over EVAL_ITERS random batches."""
    F = torch.nn.functional
    losses = []
    model.eval()
    with torch.no_grad():
        for _ in range(EVAL_ITERS):
            x, y = get_batch(torch, data)
            logits = model(x)
            losses.append(
                float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)))
            )
    model.train()
    return sum(losses) / len(losses)


def run_peer(steps: int) -> dict:
    torch = import_torch()
    F = torch.nn.functional
    threads = bc.cores()
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    print(f"[peer] nanoGPT GPT in PyTorch {torch.__version__}, {threads} threads", flush=True)
    load_before = bc.load_average()
    wall_started = time.perf_counter()
    train_data, val_data, vocab_size = load_char_data(torch)
    model = build_gpt(torch, vocab_size)
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    optimizer = make_optimizer(torch, model)
    decay_iters = steps  # nanoGPT: lr_decay_iters = max_iters
    model.train()

    train_time, first_iter, loss_value = 0.0, None, None
    iter_times = []
    val_curve = {}
    meter = bc.CpuMeter().start()
    for it in range(steps):
        started = time.perf_counter()
        lr = nanogpt_lr(it, decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(torch, train_data)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (it + 1) % LOG_INTERVAL == 0 or it + 1 == steps:
            loss_value = loss.item()
        elapsed = time.perf_counter() - started
        train_time += elapsed
        iter_times.append(elapsed)
        if first_iter is None:
            first_iter = elapsed
        done = it + 1
        if done % EVAL_EVERY == 0 or done == steps:  # outside the timed region
            val_curve[str(done)] = full_split_loss(torch, model, val_data)
            print(
                f"[peer] step {done}: train loss {loss_value:.4f}, "
                f"val loss {val_curve[str(done)]:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - wall_started  # data, model, training, full-split evals
    meter.stop()
    estimate_val = estimate_loss(torch, model, val_data)
    estimate_train = estimate_loss(torch, model, train_data)
    tokens = steps * BATCH_SIZE * BLOCK_SIZE
    result = {
        "implementation": "nanoGPT model.py GPT re-implemented in PyTorch (this file)",
        "torch": torch.__version__,
        "threads": threads,
        "steps": steps,
        "params": params,
        "params_non_embedding": params - model.wpe.weight.numel(),  # nanoGPT's count
        "val_loss": val_curve[str(steps)],
        "val_curve": val_curve,
        "nanogpt_estimate": {"val": estimate_val, "train": estimate_train, "iters": EVAL_ITERS},
        "final_train_loss": loss_value,
        "train_tokens_per_sec": tokens / train_time,
        "train_seconds": train_time,
        "ms_per_iter": 1000 * train_time / steps,
        "median_step_tokens_per_sec": BATCH_SIZE
        * BLOCK_SIZE
        / bc.median(iter_times[1:] or iter_times),
        "cpu": meter.result,
        "first_iter_seconds": first_iter,
        "wall_seconds": wall,
        "load_average_before": load_before,
        "load_average_after": bc.load_average(),
    }
    print(
        f"[peer] val loss {result['val_loss']:.4f} (nanoGPT estimate {estimate_val:.4f}), "
        f"{result['train_tokens_per_sec']:.0f} tokens/s, {result['ms_per_iter']:.1f} ms/iter",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------
def report(result: dict) -> None:
    ours, peer = result.get("ours"), result.get("peer")
    print()
    print(
        f"nanoGPT baby GPT on tiny Shakespeare: {result['steps']} steps, batch "
        f"{BATCH_SIZE} x {BLOCK_SIZE} tokens"
    )
    bc.print_machine(result["machine"])
    rows = []
    for label, r in (("deepseek-tf", ours), ("nanoGPT (PyTorch)", peer)):
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
        note = "" if result["steps"] == 2000 else " (short run: not comparable)"
        print(
            f"deepseek-tf val loss {ours['val_loss']:.4f} {verdict} the {TARGET_VAL_LOSS} "
            f"target{note}"
        )
    ratios = result["ratios"]
    speed = ratios.get("train_tokens_per_sec")
    if speed is not None:
        verdict = "meets" if speed >= SPEED_GOAL else "misses"
        median = bc.fmt(ratios.get("median_step_tokens_per_sec"), ".2f")
        wall = bc.fmt(ratios.get("wall_peer_over_ours"), ".2f")
        print(
            f"train tokens/s, deepseek-tf / nanoGPT: {speed:.2f}x ({verdict} the goal of "
            f">= {SPEED_GOAL}x); median step: {median}x; wall time, nanoGPT / deepseek-tf: "
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
    parser.add_argument("--skip-peer", action="store_true", help="run deepseek-tf only")
    parser.add_argument("--skip-ours", action="store_true", help="run the PyTorch peer only")
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
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
        "targets": {"val_loss": TARGET_VAL_LOSS, "train_tokens_per_sec_ratio": SPEED_GOAL},
        "ours": None,
        "peer": None,
        "ratios": {},
    }
    if not args.skip_ours:
        with tempfile.TemporaryDirectory(prefix="bench-shakespeare-") as tmp:
            run_dir = Path(tmp) / "run"
            quiet = bc.maybe_wait_quiet("ours", args.wait_quiet)
            result["ours"] = run_ours(args.steps, run_dir)
            result["ours"]["wait_quiet"] = quiet
            if args.keep_run:
                shutil.copytree(tmp, args.keep_run)
    if not args.skip_peer:
        quiet = bc.maybe_wait_quiet("peer", args.wait_quiet)
        result["peer"] = run_peer(args.steps)
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
    path = bc.write_json(args.out, result)
    report(result)
    print(f"result: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
