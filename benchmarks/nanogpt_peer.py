"""nanoGPT's GPT and train.py loop, re-written in PyTorch (benchmark-only peer).

Written from nanoGPT's description, not copied: learned position embeddings,
pre-LayerNorm blocks without biases, causal attention through
F.scaled_dot_product_attention, 4x GELU MLP, tied embeddings, dropout 0; AdamW(0.9,
0.99), weight decay on 2-D parameters only, warm-up + cosine schedule, clipping, random
64-token windows of the train split; nanoGPT's speed settings (`torch.compile`, bf16
autocast), the fastest on this CPU unless one is named (`peer_speed`). Used by
`shakespeare_char.py` and `speedrun.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import bench_common as bc
from peer_speed import SPEEDS, Speed, fastest, prepare


@dataclass(frozen=True)
class Recipe:
    """One of nanoGPT's Shakespeare-char recipes (config/train_shakespeare_char.py)."""

    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64  # context
    dropout: float = 0.0
    bias: bool = False
    # training
    batch_size: int = 12
    max_iters: int = 2000  # also lr_decay_iters
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0


# the README's CPU overrides ("baby GPT"): 4 x 128, context 64, batch 12, 2000 iterations
BABY = Recipe()
# the GPU recipe as the config file ships it: 6 x 384, context 256, batch 64, dropout 0.2
GPU = Recipe(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
             max_iters=5000)  # fmt: skip

VAL_FRACTION = 0.1
SEED = 1337
EVAL_ITERS = 200  # nanoGPT-style estimate: mean over this many random batches
EVAL_EVERY = 500  # peer's full-split evaluations, at the steps the preset evaluates
LOG_INTERVAL = 10  # nanoGPT reads loss.item() only every log_interval iterations
# a speed trial: untimed iterations (compilation), then ~TRIAL_SECONDS of timed ones
TRIAL_WARM, TRIAL_SECONDS, TRIAL_ITERS = 2, 10.0, 250


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


def build_gpt(torch, vocab_size: int, r: Recipe = BABY):
    """nanoGPT's GPT for recipe `r` (written from its description)."""
    nn = torch.nn
    F = torch.nn.functional

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(r.n_embd, 3 * r.n_embd, bias=r.bias)  # q, k, v at once
            self.c_proj = nn.Linear(r.n_embd, r.n_embd, bias=r.bias)
            self.resid_dropout = nn.Dropout(r.dropout)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            # (B, T, C) -> (B, H, T, C / H)
            q, k, v = (z.view(b, t, r.n_head, c // r.n_head).transpose(1, 2) for z in (q, k, v))
            p = r.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(r.n_embd, 4 * r.n_embd, bias=r.bias)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * r.n_embd, r.n_embd, bias=r.bias)
            self.dropout = nn.Dropout(r.dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(r.n_embd, bias=r.bias)
            self.attn = SelfAttention()
            self.ln_2 = nn.LayerNorm(r.n_embd, bias=r.bias)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab_size, r.n_embd)
            self.wpe = nn.Embedding(r.block_size, r.n_embd)
            self.drop = nn.Dropout(r.dropout)
            self.blocks = nn.ModuleList(Block() for _ in range(r.n_layer))
            self.ln_f = nn.LayerNorm(r.n_embd, bias=r.bias)
            self.lm_head = nn.Linear(r.n_embd, vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight  # weight tying
            for module in self.modules():
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            # residual projections: GPT-2's scaled initialisation
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * r.n_layer))

        def forward(self, idx):
            t = idx.shape[1]
            pos = torch.arange(t, dtype=torch.long, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.ln_f(x))  # (B, T, V)

    return GPT()


def make_optimizer(torch, model, r: Recipe = BABY):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": r.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=r.learning_rate, betas=r.betas)


def nanogpt_lr(it: int, decay_iters: int, r: Recipe = BABY) -> float:
    """Linear warm-up, cosine decay to `min_lr` at `decay_iters`, then flat."""
    if it < r.warmup_iters:
        return r.learning_rate * (it + 1) / (r.warmup_iters + 1)
    if it > decay_iters:
        return r.min_lr
    ratio = (it - r.warmup_iters) / (decay_iters - r.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return r.min_lr + coeff * (r.learning_rate - r.min_lr)


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


def get_batch(torch, data, r: Recipe = BABY):
    """nanoGPT's get_batch: `batch_size` windows at uniformly random offsets."""
    ix = torch.randint(len(data) - r.block_size, (r.batch_size,))
    index = ix[:, None] + torch.arange(r.block_size)[None, :]  # (B, T)
    return data[index], data[index + 1]


def full_split_loss(torch, model, data, r: Recipe = BABY, batch: int = 128) -> float:
    """Mean token loss over non-overlapping (block_size + 1)-token blocks from offset 0,
    the last partial block dropped: exactly what deepseek-tf's eval dataset covers."""
    F = torch.nn.functional
    n = len(data) // (r.block_size + 1) * (r.block_size + 1)
    blocks = data[:n].view(-1, r.block_size + 1)  # (N, T + 1)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            b = blocks[i : i + batch]
            x, y = b[:, :-1], b[:, 1:]
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
            total += float(loss)
            count += y.numel()
    model.train()
    return total / count


def estimate_loss(torch, model, data, r: Recipe = BABY) -> float:
    """nanoGPT's estimate_loss for one split: mean over EVAL_ITERS random batches."""
    F = torch.nn.functional
    losses = []
    model.eval()
    with torch.no_grad():
        for _ in range(EVAL_ITERS):
            x, y = get_batch(torch, data, r)
            losses.append(float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())))
    model.train()
    return sum(losses) / len(losses)


def _setup(torch) -> int:
    threads = bc.cores()
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    print(f"[peer] nanoGPT GPT in PyTorch {torch.__version__}, {threads} threads", flush=True)
    return threads


def _train_iteration(torch, model, optimizer, train_data, it: int, r: Recipe, run=None):
    """One iteration of nanoGPT's train.py loop; returns the loss tensor. `run`:
    `peer_speed.prepare`'s `(forward, context)` (None: eager float32)."""
    forward, context = run or (model, contextlib.nullcontext)
    for group in optimizer.param_groups:
        group["lr"] = nanogpt_lr(it, r.max_iters, r)
    x, y = get_batch(torch, train_data, r)
    with context():
        logits = forward(x)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def choose_speed(torch, r: Recipe, vocab_size: int, train_data, speed: Speed | None):
    """`(speed, trials)`: `speed` as given, or (None) the fastest of nanoGPT's settings
    on a few iterations of a fresh model (`peer_speed.fastest`; a given one is tried too)."""

    def trial(s: Speed) -> float:
        torch.manual_seed(SEED)
        model = build_gpt(torch, vocab_size, r)
        optimizer, run, times = make_optimizer(torch, model, r), prepare(torch, model, s), []
        for it in range(TRIAL_WARM + TRIAL_ITERS + 1):
            times.append(time.perf_counter())
            if it > TRIAL_WARM + 1 and times[-1] - times[TRIAL_WARM] > TRIAL_SECONDS:
                break
            _train_iteration(torch, model, optimizer, train_data, it, r, run).item()
        steps = [b - a for a, b in zip(times[TRIAL_WARM:], times[TRIAL_WARM + 1 :])]
        return r.batch_size * r.block_size / bc.median(steps)

    chosen, trials = fastest(trial, speeds=SPEEDS if speed is None else (speed,))
    torch.manual_seed(SEED)  # the run itself starts where an untried peer would
    print(f"[peer] training with {chosen.name}", flush=True)
    return chosen, trials


def run_peer_for(seconds: float, r: Recipe = GPU, eval_every_seconds: float = 300.0,
                 speed: Speed | None = None, fit=None) -> dict:  # fmt: skip
    """nanoGPT's recipe `r` for `seconds` of wall time (data, model, training and its
    full-split evaluations all count), evaluated every `eval_every_seconds` of wall time
    and at the end: a validation-loss vs wall-clock curve. `fit(tokens_per_sec)`: the
    recipe for the chosen setting's trial speed (a schedule fitted to `seconds`)."""
    torch = import_torch()
    threads = _setup(torch)
    started = time.perf_counter()
    train_data, val_data, vocab_size = load_char_data(torch)
    speed, trials = choose_speed(torch, r, vocab_size, train_data, speed)
    started += sum(t.get("seconds", 0.0) for t in trials)  # the trials are not the run's
    r = fit(next(t["tokens_per_sec"] for t in trials if t["speed"] == speed.name)) if fit else r
    model = build_gpt(torch, vocab_size, r)
    optimizer, run = make_optimizer(torch, model, r), prepare(torch, model, speed)
    model.train()
    curve, it, next_eval, train_time = [], 0, eval_every_seconds, 0.0
    meter = bc.CpuMeter().start()
    while it < r.max_iters and time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        loss = _train_iteration(torch, model, optimizer, train_data, it, r, run)
        it += 1
        train_time += time.perf_counter() - t0
        if time.perf_counter() - started >= next_eval:
            val = full_split_loss(torch, model, val_data, r)
            curve.append({"seconds": time.perf_counter() - started, "iter": it, "val_loss": val})
            print(f"[peer] {curve[-1]['seconds']:.0f} s, iter {it}: train loss "
                  f"{loss.item():.4f}, val loss {val:.4f}", flush=True)  # fmt: skip
            next_eval += eval_every_seconds
    if not curve or curve[-1]["iter"] != it:
        val = full_split_loss(torch, model, val_data, r)
        curve.append({"seconds": time.perf_counter() - started, "iter": it, "val_loss": val})
    meter.stop()
    return {
        "implementation": "nanoGPT model.py GPT re-implemented in PyTorch (nanogpt_peer.py)",
        "recipe": {k: v for k, v in r.__dict__.items()},
        "torch": torch.__version__,
        "threads": threads,
        "speed": speed.name,
        "speed_trials": trials,
        "params": sum(p.numel() for p in model.parameters()),
        "iterations": it,
        "curve": curve,
        "train_tokens_per_sec": it * r.batch_size * r.block_size / max(train_time, 1e-9),
        "wall_seconds": time.perf_counter() - started,
        "cpu": meter.result,
    }


def run_peer(steps: int, r: Recipe = BABY, estimate: bool = True,
             speed: Speed | None = None) -> dict:  # fmt: skip
    """nanoGPT's recipe `r` for `steps` iterations (schedule decaying over them), with
    `speed` (None: the fastest on a short trial, `choose_speed`)."""
    torch = import_torch()
    threads = _setup(torch)
    load_before = bc.load_average()
    wall_started = time.perf_counter()
    train_data, val_data, vocab_size = load_char_data(torch)
    r = dataclasses.replace(r, max_iters=steps)  # nanoGPT: lr_decay_iters = max_iters
    speed, trials = choose_speed(torch, r, vocab_size, train_data, speed)
    wall_started += sum(t.get("seconds", 0.0) for t in trials)  # the trials are not the run's
    model = build_gpt(torch, vocab_size, r)
    params = sum(p.numel() for p in model.parameters())  # tied head counted once
    optimizer, run = make_optimizer(torch, model, r), prepare(torch, model, speed)
    model.train()

    train_time, first_iter, loss_value = 0.0, None, None
    iter_times = []
    val_curve = {}
    meter = bc.CpuMeter().start()
    for it in range(steps):
        started = time.perf_counter()
        loss = _train_iteration(torch, model, optimizer, train_data, it, r, run)
        if (it + 1) % LOG_INTERVAL == 0 or it + 1 == steps:
            loss_value = loss.item()
        elapsed = time.perf_counter() - started
        train_time += elapsed
        iter_times.append(elapsed)
        if first_iter is None:
            first_iter = elapsed
        done = it + 1
        if done % EVAL_EVERY == 0 or done == steps:  # outside the timed region
            val_curve[str(done)] = full_split_loss(torch, model, val_data, r)
            print(
                f"[peer] step {done}: train loss {loss_value:.4f}, "
                f"val loss {val_curve[str(done)]:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - wall_started  # data, model, training, full-split evals
    meter.stop()
    estimate_val = estimate_loss(torch, model, val_data, r) if estimate else None
    estimate_train = estimate_loss(torch, model, train_data, r) if estimate else None
    tokens = steps * r.batch_size * r.block_size
    result = {
        "implementation": "nanoGPT model.py GPT re-implemented in PyTorch (this file)",
        "torch": torch.__version__,
        "threads": threads,
        "speed": speed.name,
        "speed_trials": trials,
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
        "median_step_tokens_per_sec": r.batch_size
        * r.block_size
        / bc.median(iter_times[1:] or iter_times),
        "cpu": meter.result,
        "first_iter_seconds": first_iter,
        "wall_seconds": wall,
        "load_average_before": load_before,
        "load_average_after": bc.load_average(),
    }
    print(
        f"[peer] val loss {result['val_loss']:.4f} "
        f"(nanoGPT estimate {bc.fmt(estimate_val, '.4f')}), "
        f"{result['train_tokens_per_sec']:.0f} tokens/s, {result['ms_per_iter']:.1f} ms/iter",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------
