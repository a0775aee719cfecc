"""Weight averaging, measured on a finished run: the validation loss of each kept
checkpoint against the uniform average of their weights.

The question it answers: would averaging weights (`train.ema_decay`, an exponential
moving average kept by the optimizer) lower the validation loss a run ends with? Its
checkpoints are the trained weights a few hundred steps apart; if their average
validates lower than each of them, a moving average over that horizon would too.
Every loss is `eval`'s: the whole validation split of the run's own data.

Usage:
    python benchmarks/checkpoint_average.py RUN_DIR                    # every checkpoint
    python benchmarks/checkpoint_average.py RUN_DIR --steps 2000 2203  # these only
"""

from __future__ import annotations

import argparse
import sys

import bench_common as bc
import numpy as np

NAME = "checkpoint_average"


def checkpoint_weights(run, model, step: int) -> list[np.ndarray]:
    """The model weights stored in `ckpt-step` of `run` (the model's own variables)."""
    from deepseek_tf.training.checkpoint import RunCheckpoint

    RunCheckpoint(run.checkpoint_dir, model).checkpoint.read(
        str(run.checkpoint_dir / f"ckpt-{step}")
    ).expect_partial()
    return [w.numpy() for w in model.weights]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, nargs="+", help="checkpoint steps (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=bc.default_out(NAME), help="result JSON path")
    args = parser.parse_args(argv)

    from deepseek_tf.api import load
    from deepseek_tf.data.pipeline import make_eval_dataset
    from deepseek_tf.rundir import RunDir
    from deepseek_tf.training.checkpoint import checkpoints_on_disk
    from deepseek_tf.training.evaluate import evaluate

    run = RunDir(args.run_dir).require()
    config = run.read_config()
    model, tokenizer = load(run.path)
    on_disk = checkpoints_on_disk(run.checkpoint_dir)  # ".../ckpt-N", oldest first
    steps = args.steps or [int(prefix.rsplit("-", 1)[1]) for prefix in on_disk]
    if len(steps) < 2:
        sys.exit(f"{run.path}: needs two checkpoints or more to average, found {steps}")

    def val_loss() -> float:
        dataset = make_eval_dataset(config.data, tokenizer, args.batch_size, split="val")
        return evaluate(model, dataset)["loss"]

    rows, stored = [], []
    for step in steps:
        stored.append(checkpoint_weights(run, model, step))
        rows.append({"checkpoints": [step], "val_loss": val_loss()})
        print(f"ckpt-{step}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    model.set_weights([np.mean(ws, axis=0) for ws in zip(*stored)])
    rows.append({"checkpoints": steps, "val_loss": val_loss()})
    print(f"average of {steps}: val loss {rows[-1]['val_loss']:.4f}")
    best_single = min(r["val_loss"] for r in rows[:-1])
    result = {
        "benchmark": NAME,
        "machine": bc.machine_info(["tensorflow", "keras"]),
        "run_dir": str(run.path),
        "rows": rows,
        "average_minus_best_single": rows[-1]["val_loss"] - best_single,
    }
    path = bc.write_json(args.out, result)
    print(f"average - best checkpoint: {result['average_minus_best_single']:+.4f}; result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
