"""nanoGPT's GPT and train.py loop, re-written in PyTorch (benchmark-only peer).

Written from nanoGPT's description, not copied: learned position embeddings,
pre-LayerNorm blocks without biases, causal attention through
F.scaled_dot_product_attention, 4x GELU MLP, tied embeddings, dropout 0; AdamW(0.9,
0.99), weight decay on 2-D parameters only, warm-up + cosine schedule, clipping, random
64-token windows of the train split. Used by `shakespeare_char.py`.
"""

from __future__ import annotations

import math
import sys
import time

import bench_common as bc

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
