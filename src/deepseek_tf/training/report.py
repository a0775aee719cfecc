"""What a training run shows: progress while it runs, the loss curves and a summary after.

The train loss shown -- on the progress bar, the plain progress lines, the evaluation
lines and in `metrics.jsonl` as `loss_avg` -- is one quantity: the mean loss of the last
`train.log_every` steps (fewer at the start of a session). `loss` in `metrics.jsonl`
stays the loss of the logged step itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOSS_CURVES_FILE = "loss_curves.png"
BAR_WIDTH = 24


class Progress:
    """Training output: on a terminal, a bar redrawn every log step with the other lines
    (evaluations, checkpoints) printed on lines of their own; otherwise (a file, a pipe)
    a plain line every log step.

    Args:
        total: the run's last step.
        window: steps the shown loss is the mean of (`train.log_every`).
        verbose: 0 prints nothing.
        stream: where to print (default `sys.stdout`).
    """

    def __init__(self, total: int, window: int, verbose=1, stream=None):
        self.total = total
        self.window = window
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open_bar = False  # a bar is drawn and its line not ended

    def message(self, text: str) -> None:
        """A line of its own (not glued to the bar)."""
        if not self.verbose:
            return
        self._end_bar()
        print(text, file=self.stream, flush=True)

    def step(self, step: int, entry: dict) -> None:
        """The log step's line: `entry` is its `metrics.jsonl` entry."""
        if not self.verbose:
            return
        line = (
            f"step {step}/{self.total}: loss {entry['loss_avg']:.4f} "
            f"(mean of last {entry['loss_avg_steps']} steps), lr {entry['lr']:.3g}, "
            f"{entry['tokens_per_sec']:,.0f} tokens/s, grad norm {entry['grad_norm']:.3f}"
        )
        if not self.tty:
            print(line, file=self.stream, flush=True)
            return
        done = min(BAR_WIDTH, BAR_WIDTH * step // max(self.total, 1))
        bar = "=" * done + (">" if done < BAR_WIDTH else "") + "." * (BAR_WIDTH - done - 1)
        self.stream.write(f"\r\x1b[K[{bar}] {line}")
        self.stream.flush()
        self._open_bar = True

    def close(self) -> None:
        self._end_bar()

    def _end_bar(self) -> None:
        if self._open_bar:
            self.stream.write("\n")
            self.stream.flush()
            self._open_bar = False


def eval_line(step: int, result: dict, loss_avg: float, steps: int) -> str:
    return (
        f"step {step}: val loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}), "
        f"train loss {loss_avg:.4f} (mean of last {steps} steps)"
    )


def curves(entries: list[dict]) -> dict:
    """`{"train": [(step, loss)], "val": [(step, val_loss)]}` from `metrics.jsonl`
    entries: the train loss is `loss_avg` where logged (else the step's `loss`)."""
    train, val = {}, {}
    for e in entries:
        if "step" not in e or "event" in e:
            continue
        if "loss" in e:
            train[e["step"]] = e.get("loss_avg", e["loss"])
        if "val_loss" in e:
            val[e["step"]] = e["val_loss"]
    return {"train": sorted(train.items()), "val": sorted(val.items())}


def best_validation(entries: list[dict]) -> tuple[float, int] | None:
    """`(best val loss, its step)`, or None when the run has no evaluation."""
    val = curves(entries)["val"]
    if not val:
        return None
    step, loss = min(val, key=lambda item: (item[1], item[0]))
    return loss, step


def write_loss_curves(run, window: int) -> Path | None:
    """Plots the train and validation loss against the step into `RUN/loss_curves.png`
    (written atomically); None when the run logged no loss."""
    data = curves(run.metrics.read())
    if not data["train"] and not data["val"]:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if data["train"]:
        axes.plot(*zip(*data["train"]), label=f"train (mean of last {window} steps)")
    if data["val"]:
        axes.plot(*zip(*data["val"]), "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(Path(run.path).name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(run.path) / LOSS_CURVES_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def summary_lines(summary: dict, example_prompt: str = "ROMEO:") -> list[str]:
    """The end of `deepseek-tf train`: time, best validation loss, where it all is, which
    weights are the run's model, and what to run next."""
    run = summary["run_dir"]
    lines = [
        f"[train] done: step {summary['step']} of {summary['steps']} in "
        f"{_duration(summary['wall_seconds'])} ({summary['train_tokens_per_sec']:,.0f} "
        "tokens/s)"
    ]
    if summary.get("best_val_loss") is not None:
        lines.append(
            f"  best validation loss {summary['best_val_loss']:.4f} at step "
            f"{summary['best_val_step']}"
        )
    else:
        lines.append("  no validation (train.eval_every=0)")
    lines.append(f"  run directory  {run}")
    lines.append(f"  model          {model_line(summary)}")
    lines.append(f"  checkpoint     {summary['checkpoint']}")
    if summary.get("loss_curves"):
        lines.append(f"  loss curves    {summary['loss_curves']}")
    lines += [
        "next:",
        f'  deepseek-tf generate {run} --prompt "{example_prompt}"',
        f"  deepseek-tf eval {run}",
        f"  deepseek-tf serve {run}",
    ]
    return lines


def model_line(summary: dict) -> str:
    """Which weights `eval`, `generate`, `export` and `serve` load: the best validation's
    (`train.keep_best`) or the last."""
    if summary.get("weights") != "best":
        return "the last weights (the checkpoint below)"
    return (
        f"best at step {summary['best_val_step']}, val loss {summary['best_val_loss']:.4f} "
        f"({summary['best_checkpoint']}; the checkpoint below keeps the last for --resume)"
    )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
