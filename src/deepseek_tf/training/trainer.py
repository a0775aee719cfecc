"""The training loop: build in the strategy's scope, step, validate, checkpoint, resume."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.config.loader import save_config
from deepseek_tf.config.schema import Config
from deepseek_tf.data.pipeline import make_eval_dataset, make_train_dataset
from deepseek_tf.errors import ConfigError, RunDirError, TrainingError
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.checkpoint import RunCheckpoint
from deepseek_tf.training.evaluate import evaluate, make_eval_step
from deepseek_tf.training.monitor import TrainingMonitor, balance_stats
from deepseek_tf.training.optim import current_learning_rate, make_optimizer
from deepseek_tf.training.runtime import (
    describe_runtime,
    is_chief,
    is_multi_worker,
    make_strategy,
)
from deepseek_tf.training.step import make_train_step

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON-lines log; on resume, entries after the checkpoint are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def write(self, **entry) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class _NoMetrics:
    """What a non-chief worker logs: nothing (the chief writes the run's files)."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, **entry) -> None:
        pass


class Trainer:
    """Trains the model of `config` on its data, writing everything to `run_dir`.

    Args:
        config: the resolved configuration (saved as `run_dir/config.yaml`).
        run_dir: output directory (config, tokenizer, checkpoints, logs).
        tokenizer: the run's tokenizer (saved into `run_dir`).
        resume: continue from the latest checkpoint of `run_dir`.
        verbose: 0 silent, 1 progress bar and log lines.
        strategy: an already created distribution strategy (default: made from
            `config.runtime`). A caller that runs TensorFlow ops before building the
            Trainer must create a MultiWorkerMirroredStrategy first and pass it here.
    """

    def __init__(
        self,
        config: Config,
        run_dir,
        tokenizer,
        *,
        resume: bool = False,
        verbose=1,
        strategy: tf.distribute.Strategy | None = None,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.tokenizer = tokenizer
        self.verbose = verbose
        t = config.train
        # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
        self.strategy = strategy or make_strategy(config.runtime)
        self.replicas = self.strategy.num_replicas_in_sync
        self.multi_worker = config.runtime.strategy == "multi_worker" or (
            self.replicas > 1 and is_multi_worker(self.strategy)
        )
        self.chief = is_chief(self.strategy)
        if t.batch_size % self.replicas:
            raise ConfigError(
                f"train.batch_size {t.batch_size} is not divisible by the {self.replicas} "
                "replicas in sync (each replica gets an equal share)"
            )
        ckpt_dir = self.run_dir / "checkpoints"
        if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
            raise RunDirError(
                f"{self.run_dir} already holds checkpoints: pass --resume to continue it, "
                "or choose another --out"
            )
        if self.chief:  # only the chief writes the run directory
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir)
            tokenizer.save(self.run_dir)

        with self.strategy.scope():
            self.model = build_model(config, tokenizer.vocab_size, seed=t.seed)
            self.optimizer = make_optimizer(t, self.model)
        self.checkpoint = RunCheckpoint(
            self.run_dir, self.model, self.optimizer, t.keep_checkpoints, chief=self.chief
        )
        self.start_step = 0
        if resume and self.checkpoint.latest:
            self.start_step = self.checkpoint.restore()
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE) if self.chief else _NoMetrics()
        self.metrics.truncate_after(self.start_step)
        self.step_fn = make_train_step(
            self.model,
            self.optimizer,
            accumulation=t.gradient_accumulation_steps,
            replicas=self.replicas,
            sparsity_threshold=t.sparsity_threshold,
            jit_compile=config.runtime.jit_compile,
            strategy=self.strategy,
            mtp_loss_weight=config.model.mtp_loss_weight,
        )
        self.eval_step = make_eval_step(self.model, config.runtime.jit_compile)
        self.writer = (
            tf.summary.create_file_writer(str(self.run_dir / "logs"))
            if self.chief
            else tf.summary.create_noop_writer()
        )

    # -- data -------------------------------------------------------------------------------
    def _train_iterator(self):
        t = self.config.train
        accumulation = t.gradient_accumulation_steps
        if self.replicas == 1:  # the default path: one pipeline, the global batch
            ds = make_train_dataset(
                self.config.data,
                self.tokenizer,
                t.batch_size,
                start_batch=self.start_step * accumulation,
            )
            if accumulation > 1:
                ds = ds.batch(accumulation, drop_remainder=True)  # (A, B, T)
            return iter(ds)
        per_replica = t.batch_size // self.replicas

        def dataset_fn(context: tf.distribute.InputContext):
            # Each worker builds its own pipeline over its shard of the blocks, batched
            # per replica; a pipeline feeding R local replicas yields R batches a step.
            local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
            ds = make_train_dataset(
                self.config.data,
                self.tokenizer,
                context.get_per_replica_batch_size(t.batch_size),
                start_batch=self.start_step * accumulation * local_replicas,
                num_shards=context.num_input_pipelines,
                shard_index=context.input_pipeline_id,
            )
            if accumulation > 1:
                ds = ds.batch(accumulation, drop_remainder=True)  # (A, B/R, T)
            return ds

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        self._log(f"[data] {per_replica} sequences per replica per micro-batch")
        return iter(self.strategy.distribute_datasets_from_function(dataset_fn, options))

    def validate(self) -> dict:
        t = self.config.train
        ds = make_eval_dataset(self.config.data, self.tokenizer, t.batch_size, split="val")
        return evaluate(self.model, ds, max_batches=t.eval_batches, step_fn=self.eval_step)

    # -- loop -------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def _save(self, step: int, last_saved: str | None) -> str:
        finite = all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.weights)
        if not finite:  # a finite loss can still be followed by an update to inf/NaN
            raise TrainingError(
                f"weights became non-finite at step {step}; stopped without saving. "
                f"Last good checkpoint: {last_saved or 'none'}"
            )
        started = time.perf_counter()
        path = self.checkpoint.save(step)
        seconds = round(time.perf_counter() - started, 3)
        self.metrics.write(step=step, event="checkpoint", path=path, seconds=seconds)
        return path

    def train(self) -> dict:
        cfg, t = self.config, self.config.train
        tokens_per_step = t.batch_size * t.gradient_accumulation_steps * self.config.data.seq_len
        info = describe_runtime(cfg.runtime, self.strategy)
        self._log(f"[runtime] {json.dumps(info)}")
        self._log(
            f"[train] steps {self.start_step}->{t.steps}, global batch {t.batch_size} x "
            f"{t.gradient_accumulation_steps} accumulation ({t.batch_size // self.replicas} per "
            f"replica x {self.replicas} replicas), {tokens_per_step} tokens/step, peak lr "
            f"{t.learning_rate}, params {self.model.count_params():,}"
        )
        monitor = TrainingMonitor(t.monitor_window, self.writer, every=t.log_every)
        monitor.set_model(self.model)
        progbar = keras.utils.Progbar(
            t.steps, verbose=1 if self.verbose and sys.stdout.isatty() else 0, interval=0.5
        )
        iterator = self._train_iterator()
        last_saved = self.checkpoint.latest
        train_time, timed_steps = 0.0, 0
        step = self.start_step
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        monitor.on_train_begin()
        try:
            while step < t.steps:
                inputs, targets, weights = next(iterator)
                started = time.perf_counter()
                out = self.step_fn(inputs, targets, weights)
                loss = float(out["loss"])
                elapsed = time.perf_counter() - started
                step += 1
                if step > self.start_step + 1:  # the first step includes compilation
                    train_time += elapsed
                    timed_steps += 1
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss} at step {step}; stopped without saving. "
                        f"Last good checkpoint: {last_saved or 'none'}"
                    )
                load = out.pop("expert_load", None)
                logs = {k: float(v) for k, v in out.items()}
                logs.update(step=step, tokens=tokens_per_step)
                if load is not None:
                    logs.update(balance_stats(load.numpy()))
                monitor.on_train_batch_end(step, logs)  # adds its signals to logs
                if step % t.log_every == 0 or step == t.steps:
                    logs["lr"] = current_learning_rate(self.optimizer)
                    if load is not None:
                        logs["expert_load"] = np.round(load.numpy(), 4).tolist()
                    self.metrics.write(**logs)
                    with self.writer.as_default(step=step):
                        tf.summary.scalar("train/loss", loss)
                        tf.summary.scalar("train/learning_rate", logs["lr"])
                    progbar.update(step, [("loss", loss), ("grad_norm", logs["grad_norm"])])
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    result = self.validate()
                    self.metrics.write(
                        step=step, val_loss=result["loss"], val_perplexity=result["perplexity"]
                    )
                    with self.writer.as_default(step=step):
                        tf.summary.scalar("val/loss", result["loss"])
                        tf.summary.scalar("val/perplexity", result["perplexity"])
                    self._log(
                        f"step {step}: train loss {loss:.4f}, val loss "
                        f"{result['loss']:.4f}, val ppl {result['perplexity']:.2f}"
                    )
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                    last_saved = self._save(step, last_saved)
        except KeyboardInterrupt:
            # A multi-worker save is collective: the other workers may be gone.
            if (
                not self.multi_worker
                and step > self.start_step
                and step != self.checkpoint.step.numpy()
            ):
                last_saved = self._save(step, last_saved)
            self._log(f"[train] interrupted at step {step}; saved {last_saved}")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            monitor.on_train_end()
            self.writer.flush()
            self.checkpoint.close()
        summary = {
            "step": step,
            "train_tokens_per_sec": tokens_per_step * timed_steps / train_time if train_time else 0,
            "train_seconds": train_time,
            "checkpoint": last_saved,
        }
        self.metrics.write(event="summary", **summary)
        return summary


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
