"""The training loop: build in the strategy's scope, step, validate, checkpoint, resume."""

from __future__ import annotations

import collections
import json
import math
import signal
import sys
import time

import numpy as np
import tensorflow as tf

from deepseek_tf.config.schema import Config
from deepseek_tf.data.pipeline import make_eval_dataset, make_step_dataset, next_batch
from deepseek_tf.errors import ConfigError, TrainingError
from deepseek_tf.models.builder import build_model
from deepseek_tf.models.lora import apply_lora, describe_lora
from deepseek_tf.rundir import NoMetrics, RunDir
from deepseek_tf.training import expert_parallel as ep
from deepseek_tf.training.evaluate import evaluate, make_eval_step
from deepseek_tf.training.init_from import load_initial_weights
from deepseek_tf.training.monitor import TrainingMonitor, balance_stats
from deepseek_tf.training.optim import current_learning_rate, make_optimizer, schedule_change
from deepseek_tf.training.report import Progress, best_validation, eval_line, write_loss_curves
from deepseek_tf.training.runtime import (
    LOST_WORKER_ERRORS,
    describe_runtime,
    is_chief,
    is_multi_worker,
    make_strategy,
)
from deepseek_tf.training.signals import _raise_interrupt, signals_deferred
from deepseek_tf.training.step import make_train_step
from deepseek_tf.training.tracking import Trackers, check_available
from deepseek_tf.training.weight_average import WeightAverage, check_same_averaging

__all__ = ["Trainer", "signals_deferred", "_raise_interrupt"]


class Trainer:
    """Trains the model of `config` on its data, writing everything to `run_dir`.

    Nothing is written to `run_dir` before a resumed run's checkpoint has been restored:
    a failed `--resume` leaves the run as it was.

    Args:
        config: the resolved configuration (saved as `run_dir/config.yaml`).
        run_dir: output directory (config, tokenizer, checkpoints, metrics, logs; at the
            end `loss_curves.png`; `tensorboard/`, `wandb/` with `train.loggers`).
        tokenizer: the run's tokenizer (saved into `run_dir`).
        resume: continue from the newest readable checkpoint of `run_dir`.
        verbose: 0 silent, 1 progress (a bar on a terminal, else a line every
            `train.log_every` steps) and log lines; see `training.report`.
        strategy: an already created distribution strategy (default: made from
            `config.runtime`). A caller that runs TensorFlow ops before building the
            Trainer must create a MultiWorkerMirroredStrategy first and pass it here.
        init_from: a run or Hugging Face directory whose weights initialise the model
            (fine-tuning; see `training.init_from`), with a fresh optimizer.
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
        init_from=None,
    ):
        self.config = config
        self.run = RunDir(run_dir)
        self.run_dir = self.run.path
        self.tokenizer = tokenizer
        self.verbose = verbose
        self.resume = resume
        t = config.train
        check_available(t.loggers)  # a missing tracker package: one line, before any work
        self.progress = Progress(t.steps, t.log_every, verbose)
        self.trackers = None
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
        self.previous_config = self.run.read_config() if resume else None
        ep.check_same_shards(self.previous_config, config)
        check_same_averaging(self.previous_config, config)
        if not resume:
            self.run.check_new()

        self.initialized_from, self.init_from = None, init_from
        with self.strategy.scope():
            if init_from is None:
                self.model = build_model(config, seed=t.seed)
            else:  # the source's weights first, then (LoRA) adapters on top of them
                self.model = build_model(config, seed=t.seed, lora=False)
                self.initialized_from = load_initial_weights(self.model, init_from)
                if t.lora_rank:
                    apply_lora(self.model, t.lora_rank, t.lora_alpha, t.lora_targets)
            experts = ep.shard_model_experts(self.model, config.runtime, self.replicas)
            self.optimizer = make_optimizer(t, self.model)
            self.expert_update = ep.ExpertUpdate(self.optimizer, experts) if experts else None
            self.average = WeightAverage(self.model, self.optimizer, t.ema_decay)
        extra = {**ep.checkpoint_objects(self.expert_update), **self.average.checkpoint_objects()}
        self.checkpoint = self.run.checkpoint(
            self.model, self.optimizer, t.keep_checkpoints, chief=self.chief, extra=extra
        )
        self.checkpoint.log = self._log
        self.start_step, self.restored = 0, None
        if resume and self.checkpoint.latest:
            self.start_step = self.checkpoint.restore()
            self.restored = f"ckpt-{self.start_step}"  # checkpoints are numbered by step
            self.average.restore_trained()  # the model restored the average
        self.metrics = self.run.metrics if self.chief else NoMetrics()
        self.step_fn = make_train_step(
            self.model,
            self.optimizer,
            accumulation=t.gradient_accumulation_steps,
            replicas=self.replicas,
            sparsity_threshold=t.sparsity_threshold,
            jit_compile=config.runtime.jit_compile,
            strategy=self.strategy,
            mtp_loss_weight=config.model.mtp_loss_weight,
            expert_update=self.expert_update,
        )
        jit = config.runtime.jit_compile and not experts  # sharded: read whole, without XLA
        self.eval_step = make_eval_step(self.model, jit)
        self.writer = None

    # -- data -------------------------------------------------------------------------------
    def _train_iterator(self):
        t = self.config.train
        accumulation = t.gradient_accumulation_steps
        if self.replicas == 1:  # the default path: one pipeline, the global batch
            return iter(
                make_step_dataset(
                    self.config.data,
                    self.tokenizer,
                    t.batch_size,
                    accumulation=accumulation,
                    start_step=self.start_step,
                )
            )
        per_replica = t.batch_size // self.replicas

        def dataset_fn(context: tf.distribute.InputContext):
            # Each worker builds its own pipeline over its shard of the blocks, batched
            # per replica; a pipeline feeding R local replicas yields R batches a step.
            local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
            return make_step_dataset(
                self.config.data,
                self.tokenizer,
                context.get_per_replica_batch_size(t.batch_size),
                accumulation=accumulation,
                start_step=self.start_step * local_replicas,
                num_shards=context.num_input_pipelines,
                shard_index=context.input_pipeline_id,
            )  # (B/R, T) or (A, B/R, T)

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        self._log(f"[data] {per_replica} sequences per replica per micro-batch")
        return iter(self.strategy.distribute_datasets_from_function(dataset_fn, options))

    def validate(self) -> dict:
        t = self.config.train
        ds = make_eval_dataset(self.config.data, self.tokenizer, t.batch_size, split="val")
        with self.average.averaged():  # train.ema_decay: the averaged weights' loss
            return evaluate(self.model, ds, max_batches=t.eval_batches, step_fn=self.eval_step)

    # -- the run directory --------------------------------------------------------------------
    def _log(self, message: str) -> None:
        self.progress.message(message)  # on a line of its own, never glued to the bar

    def _prepare_run_dir(self) -> None:
        """Writes the config and tokenizer of a new run; on resume, drops the metrics after
        the restored step, sets corrupt checkpoints aside and saves a changed config. Only
        called once the checkpoint is restored; only the chief writes."""
        if self.chief:
            if not self.resume:
                self.run.write_config(self.config)
                self.run.write_tokenizer(self.tokenizer)
                if self.init_from is not None:  # where the weights came from (`info`)
                    t = self.config.train
                    entry = {"method": "init_from", "source": str(self.init_from)}
                    if t.lora_rank:
                        entry.update(lora_rank=t.lora_rank, lora_targets=list(t.lora_targets))
                    self.run.write_history([entry])
            else:
                self.checkpoint.set_aside_unreadable()
                self.metrics.truncate_after(self.start_step)
                if self.config != self.previous_config:
                    self.run.write_config(self.config)
        self.writer = (
            tf.summary.create_file_writer(str(self.run.logs_dir))
            if self.chief
            else tf.summary.create_noop_writer()
        )
        if self.chief and self.config.train.loggers:
            self.trackers = Trackers(self.run, self.config, log=self._log)

    def _describe_resume(self) -> None:
        t = self.config.train
        if self.restored:
            self._log(
                f"[resume] restored {self.run.checkpoint_dir / self.restored} "
                f"(step {self.start_step} of {t.steps})"
            )
        else:
            self._log("[resume] the run has no checkpoint yet: starting at step 0")
        warning = schedule_change(self.previous_config.train, t, self.start_step)
        if warning:
            print(f"[resume] warning: {warning}", file=sys.stderr, flush=True)

    def _save(self, step: int, last_saved: str | None) -> str:
        finite = all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.weights)
        if not finite:  # a finite loss can still be followed by an update to inf/NaN
            raise TrainingError(
                f"weights became non-finite at step {step}; stopped without saving. "
                f"Last good checkpoint: {last_saved or 'none'}"
            )
        started = time.perf_counter()
        # SIGTERM/Ctrl-C during the write: after it; the average saved as the model's weights
        with signals_deferred(), self.average.averaged():
            path = self.checkpoint.save(step)
        seconds = round(time.perf_counter() - started, 3)
        self.metrics.write(step=step, event="checkpoint", path=path, seconds=seconds)
        return path

    # -- loop -------------------------------------------------------------------------------
    def train(self) -> dict:
        wall_started = time.perf_counter()
        cfg, t = self.config, self.config.train
        if self.resume:
            self._describe_resume()
        if self.initialized_from:
            self._log(f"[init] weights from {self.initialized_from}")
        if t.lora_rank:
            self._log(describe_lora(self.model, t.lora_rank, t.lora_targets))
        if self.start_step >= t.steps:
            self._log(
                f"[train] already complete (step {self.start_step} of {t.steps}): "
                f"{self.run_dir}; pass --set train.steps=N to train further"
            )
            return {
                "step": self.start_step,
                "already_complete": True,
                "chief": self.chief,
                "checkpoint": self.checkpoint.latest,
                "train_tokens_per_sec": 0.0,
                "train_seconds": 0.0,
            }
        self._prepare_run_dir()
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
        self.recent_losses = collections.deque(maxlen=t.log_every)  # the loss shown
        iterator = self._train_iterator()
        last_saved = self.checkpoint.latest
        train_time, timed_steps = 0.0, 0
        step = self.start_step
        # train.time_limit_minutes: a wall-clock budget from here (a speedrun's guard)
        deadline = wall_started + 60.0 * t.time_limit_minutes if t.time_limit_minutes else None
        stopped = None
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        monitor.on_train_begin()
        try:
            while step < t.steps:
                inputs, targets, weights = next_batch(iterator)
                started = time.perf_counter()
                out = self._run_step(step, inputs, targets, weights)
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
                self.recent_losses.append(loss)
                load = out.pop("expert_load", None)
                logs = {k: float(v) for k, v in out.items()}
                logs.update(step=step, tokens=tokens_per_step)
                if load is not None:
                    logs.update(balance_stats(load.numpy()))
                monitor.on_train_batch_end(step, logs)  # adds its signals to logs
                if step % t.log_every == 0 or step == t.steps:
                    self._log_step(step, logs, load)
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    self._evaluate(step)
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                    last_saved = self._save(step, last_saved)
                if deadline is not None and step < t.steps and time.perf_counter() >= deadline:
                    stopped = "time_limit"
                    self._log(f"[train] time limit ({t.time_limit_minutes:g} min) at step {step}")
                    if t.eval_every and step % t.eval_every:
                        self._evaluate(step)
                    if step != self.checkpoint.step.numpy():
                        last_saved = self._save(step, last_saved)
                    break
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
            self.progress.close()
            self.writer.flush()
            self.checkpoint.close()
            if self.trackers is not None:
                self.trackers.finish(last_saved if step == t.steps else None)
        summary = {
            "step": step,
            "train_tokens_per_sec": tokens_per_step * timed_steps / train_time if train_time else 0,
            "train_seconds": train_time,
            "checkpoint": last_saved,
            "chief": self.chief,
        }
        if stopped:
            summary["stopped"] = stopped
        self.metrics.write(event="summary", **summary)
        summary.update(steps=t.steps, run_dir=str(self.run_dir), loss_curves=None)
        summary["wall_seconds"] = time.perf_counter() - wall_started
        best = best_validation(self.metrics.read())
        summary.update(best_val_loss=best and best[0], best_val_step=best and best[1])
        if self.chief:
            try:
                path = write_loss_curves(self.run, t.log_every)
                summary["loss_curves"] = str(path) if path else None
            except Exception as e:  # noqa: BLE001 - a plot never fails a finished run
                self._log(f"[train] could not write the loss curves: {e}")
        return summary

    def _log_step(self, step: int, logs: dict, load) -> None:
        """A log step: `metrics.jsonl`, the trackers, TensorBoard's `logs/`, the progress."""
        logs["lr"] = current_learning_rate(self.optimizer)
        logs["loss_avg"] = float(np.mean(self.recent_losses))
        logs["loss_avg_steps"] = len(self.recent_losses)
        if load is not None:
            logs["expert_load"] = np.round(load.numpy(), 4).tolist()
        self.metrics.write(**logs)
        if self.trackers is not None:
            self.trackers.log(step, logs)
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", logs["loss"])
            tf.summary.scalar("train/learning_rate", logs["lr"])
        self.progress.step(step, logs)

    def _evaluate(self, step: int) -> None:
        result = self.validate()
        entry = {"step": step, "val_loss": result["loss"], "val_perplexity": result["perplexity"]}
        self.metrics.write(**entry, time=round(time.time(), 3))  # wall clock: time-to-loss
        if self.trackers is not None:
            self.trackers.log(step, entry)
        with self.writer.as_default(step=step):
            tf.summary.scalar("val/loss", result["loss"])
            tf.summary.scalar("val/perplexity", result["perplexity"])
        self._log(eval_line(step, result, np.mean(self.recent_losses), len(self.recent_losses)))

    def _run_step(self, step: int, inputs, targets, weights) -> dict:
        """One training step; a worker lost mid-collective is a one-line `TrainingError`."""
        try:
            return self.step_fn(inputs, targets, weights)
        except LOST_WORKER_ERRORS as e:
            if not self.multi_worker:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(
                f"lost contact with another worker at step {step + 1} ({type(e).__name__}: "
                f"{first[:200]}); restart every worker with --resume to continue from the "
                "last checkpoint"
            ) from None
