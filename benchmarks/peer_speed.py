"""How the nanoGPT peer runs fastest on this CPU.

nanoGPT's train.py has two speed settings: `compile` (`torch.compile` of the model, on by
default) and `dtype` (the forward pass and loss under `torch.autocast`, bfloat16 where the
hardware has it). Its README turns compilation off for CPUs without a working compiler;
which of the four combinations is fastest depends on the CPU and the shapes, so the peer
tries each for a few iterations (`fastest`) and trains with the winner. The validation
losses are always computed in float32, without compilation, on the same weights.

Examples:

>>> parse_speed("compiled-bf16")
Speed(compile=True, bf16=True)
>>> parse_speed("auto") is None
True
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Speed:
    """One combination of nanoGPT's speed settings."""

    compile: bool = False  # torch.compile (inductor)
    bf16: bool = False  # torch.autocast("cpu", bfloat16) around the forward pass and loss

    @property
    def name(self) -> str:
        return f"{'compiled' if self.compile else 'eager'}-{'bf16' if self.bf16 else 'fp32'}"


SPEEDS = tuple(Speed(c, b) for c in (False, True) for b in (False, True))
CHOICES = ("auto", *(s.name for s in SPEEDS))


def parse_speed(text: str) -> Speed | None:
    """The `Speed` named `text` (see `CHOICES`); None for "auto" (`fastest` decides)."""
    if text == "auto":
        return None
    for speed in SPEEDS:
        if speed.name == text:
            return speed
    raise ValueError(f"unknown peer speed {text!r}; choose one of {', '.join(CHOICES)}")


def prepare(torch, model, speed: Speed):
    """`(forward, context)`: the callable a training step runs and the context factory
    its forward pass and loss run in."""
    forward = torch.compile(model) if speed.compile else model
    if speed.bf16:
        return forward, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return forward, contextlib.nullcontext


def add_speed_arg(parser) -> None:
    """`--peer-speed {auto, eager-fp32, ...}`, read back with `parse_speed`."""
    parser.add_argument(
        "--peer-speed", choices=CHOICES, default="auto",
        help="the peer's torch.compile / bf16 autocast (auto: the fastest on a short trial)",
    )  # fmt: skip


def fastest(trial: Callable[[Speed], float], log=print, speeds=SPEEDS) -> tuple[Speed, list[dict]]:
    """Runs `trial(speed)` (training tokens/s of a short run, compilation excluded) for
    every speed of `speeds`; returns the fastest and every trial's result (with its wall
    `seconds`, which a caller leaves out of its own wall time). A speed whose trial
    fails (no C++ compiler for inductor, no bfloat16 kernels) is skipped."""
    trials = []
    for speed in speeds:
        started = time.perf_counter()
        try:
            rate = trial(speed)
        except Exception as e:  # noqa: BLE001 -- a setting this machine cannot run
            log(f"[peer] {speed.name}: failed ({type(e).__name__}: {str(e)[:120]})")
            rate, error = None, str(e)[:300]
        else:
            log(f"[peer] {speed.name}: {rate:,.0f} tokens/s")
            error = None
        seconds = time.perf_counter() - started
        trials.append({"speed": speed.name, "tokens_per_sec": rate, "seconds": seconds,
                       **({"error": error} if error else {})})  # fmt: skip
    ran = [(t["tokens_per_sec"], s) for t, s in zip(trials, speeds) if t["tokens_per_sec"]]
    if not ran:
        raise RuntimeError("no peer speed setting ran on this machine")
    return max(ran, key=lambda pair: pair[0])[1], trials
