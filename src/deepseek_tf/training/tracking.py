"""Experiment tracking: the run's scalars and config in TensorBoard and Weights & Biases.

`train.loggers` names the trackers (`tensorboard`, `wandb`). Each receives what the
trainer writes to `metrics.jsonl` -- the same numbers -- as scalars named `train/<key>`
(`train/loss`, `train/lr`, `train/tokens_per_sec`, `train/grad_norm`, the MoE balance
stats, ...) and `val/<key>` for the evaluation entries (`val/loss`, `val/perplexity`),
plus the resolved config once at the start:

- `tensorboard`: `tf.summary` event files in `RUN/tensorboard/`, the config as a text
  summary (`tensorboard --logdir RUN/tensorboard`);
- `wandb`: a Weights & Biases run (project `$WANDB_PROJECT`, default `deepseek-tf`;
  files under `RUN/wandb/`; `WANDB_MODE=offline` keeps it local), the config as its
  `config`, and with `train.log_weights` the final checkpoint as a `model` artifact.
  `wandb` is imported only when configured (the `[tracking]` extra).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import tensorflow as tf

from deepseek_tf.config.loader import config_to_dict, config_to_yaml
from deepseek_tf.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/ (the `tensorboard` logger)
# the step itself, a constant, a label, the size of the loss_avg window
# `time` is the wall-clock stamp of a line (trackers stamp their own)
SKIPPED_KEYS = ("step", "tokens", "event", "loss_avg_steps", "time")


def scalar_name(key: str) -> str:
    """The tracker's name of a `metrics.jsonl` key: `val_loss` -> `val/loss`,
    `grad_norm` -> `train/grad_norm`."""
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    return f"train/{key}"


def scalars(entry: dict) -> dict[str, float]:
    """The numeric entries of a `metrics.jsonl` line, under their tracker names."""
    return {
        scalar_name(k): float(v)
        for k, v in entry.items()
        if k not in SKIPPED_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def check_available(loggers) -> None:
    """Raises a one-line `ConfigError` for a configured tracker whose package is missing
    (before anything is trained or written)."""
    if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "train.loggers: wandb is not installed: pip install deepseek-tf[tracking]"
        )


class TensorBoardLogger:
    """Scalars and the config as `tf.summary` events in `RUN/tensorboard/`."""

    def __init__(self, run, config):
        self.directory = Path(run.path) / TENSORBOARD_DIR
        self.writer = tf.summary.create_file_writer(str(self.directory))
        text = "    " + config_to_yaml(config).replace("\n", "\n    ")  # a Markdown code block
        with self.writer.as_default(step=0):
            tf.summary.text("config", text)
        self.writer.flush()

    def log(self, step: int, values: dict[str, float]) -> None:
        with self.writer.as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def finish(self, checkpoint=None) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run: scalars, the config, optionally the final weights."""

    def __init__(self, run, config, log_weights: bool = False):
        import wandb  # the optional [tracking] extra (see `check_available`)

        self.wandb = wandb
        self.run_path = Path(run.path)
        self.log_weights = log_weights
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "deepseek-tf"),
            name=self.run_path.name,
            dir=str(self.run_path),
            config=config_to_dict(config),
            reinit="create_new",
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, checkpoint=None) -> None:
        try:
            if self.log_weights and checkpoint:
                artifact = self.wandb.Artifact(f"{self.run_path.name}-weights", type="model")
                for path in self._weight_files(checkpoint):
                    artifact.add_file(str(path), name=str(path.relative_to(self.run_path)))
                self.run.log_artifact(artifact)
        finally:
            self.run.finish()

    def _weight_files(self, checkpoint: str) -> list[Path]:
        """The final checkpoint's files, the config and the tokenizer: a loadable run."""
        prefix = Path(checkpoint)
        files = sorted(prefix.parent.glob(prefix.name + ".*"))
        files += [p for p in sorted(self.run_path.glob("*.json")) if "tokenizer" in p.name]
        return files + [self.run_path / "config.yaml"]


class Trackers:
    """The configured trackers, called as one; a tracker that fails is reported once and
    dropped (tracking never stops a training run)."""

    def __init__(self, run, config, log=print):
        t = config.train
        self.log_message = log
        self.trackers = []
        for name in dict.fromkeys(t.loggers):
            if name == "tensorboard":
                self.trackers.append(TensorBoardLogger(run, config))
            elif name == "wandb":
                self.trackers.append(WandbLogger(run, config, t.log_weights))

    def log(self, step: int, entry: dict) -> None:
        values = scalars(entry)
        if not values:
            return
        for tracker in list(self.trackers):
            try:
                tracker.log(step, values)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not end the run
                self.log_message(f"[tracking] {type(tracker).__name__} stopped: {e}")
                self.trackers.remove(tracker)

    def finish(self, checkpoint=None) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish(checkpoint)
            except Exception as e:  # noqa: BLE001
                self.log_message(f"[tracking] {type(tracker).__name__}: {e}")
        self.trackers = []
