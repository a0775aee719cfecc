"""The trainer: build in the strategy's scope, check the data, run the loop, checkpoint, resume.

`Trainer.train` reads top to bottom: announce, check the data (before step 1 and before
anything is written), prepare the run directory, run the one training loop
(`training.loop.run_steps`) with this run's stop rules (the step count, the time limit,
a signal), summarise. A step that is due both a checkpoint and an evaluation saves first:
a failing evaluation never costs the trained weights (a new best is kept after it:
`train.keep_best`, `training.best`).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from deepseek_tf.config.schema import Config
from deepseek_tf.config.stages import parse_stages
from deepseek_tf.data.pipeline import check_validation_data
from deepseek_tf.errors import ConfigError, TrainingError
from deepseek_tf.models.builder import build_model
from deepseek_tf.models.lora import apply_lora, describe_lora
from deepseek_tf.run_layout import RunLayout
from deepseek_tf.training import batches
from deepseek_tf.training import expert_parallel as ep
from deepseek_tf.training.best import BestWeights
from deepseek_tf.training.evaluate import evaluate, make_eval_step
from deepseek_tf.training.loop import LoopResult, NonFiniteLoss, run_steps
from deepseek_tf.training.optim import (
    current_learning_rate,
    make_optimizer,
    schedule_change,
    warmup_warning,
)
from deepseek_tf.training.recorder import RunRecorder
from deepseek_tf.training.runtime import (
    LOST_WORKER_ERRORS,
    describe_runtime,
    is_chief,
    is_multi_worker,
    make_strategy,
)
from deepseek_tf.training.signals import raise_interrupt, signals_deferred
from deepseek_tf.training.step import make_train_step
from deepseek_tf.training.tracking import check_available
from deepseek_tf.training.weight_average import WeightAverage, check_same_averaging

__all__ = ["Trainer"]


class Trainer:
    """Trains the model of `config` on its data, writing everything to `run_dir`.

    Nothing is written to `run_dir` before a resumed run's checkpoint has been restored
    and the data checked: a failed `--resume` or unusable data leaves the run as it was.

    Args:
        config: the resolved configuration (saved as `run_dir/config.yaml`).
        run_dir: output directory (config, tokenizer, checkpoints, metrics, logs; at the
            end `loss_curves.png`; `tensorboard/`, `wandb/` with `train.loggers`; `best/`
            with `train.keep_best`).
        tokenizer: the run's tokenizer (saved into `run_dir`).
        resume: continue from the newest readable checkpoint of `run_dir`.
        verbose: 0 silent, 1 progress (a bar on a terminal, else a line every
            `train.log_every` steps) and log lines; see `training.report`.
        strategy: an already created distribution strategy (default: made from
            `config.runtime`). A caller that runs TensorFlow ops before building the
            Trainer must create a MultiWorkerMirroredStrategy first and pass it here.
        init_from: a run or Hugging Face directory whose weights initialise the model
            (fine-tuning), with a fresh optimizer; recorded in the run's history.
        load_weights: `fn(model) -> str` that assigns `init_from`'s weights to the
            built model (before LoRA adapters) and says what it loaded
            (`convert.init_from.load_initial_weights`); required with `init_from`.

    Examples:
        summary = Trainer(config, "runs/x", tokenizer).train()  # {"step", "checkpoint", ...}
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
        load_weights: Callable[[keras.Model], str] | None = None,
    ):
        self.config, self.tokenizer, self.verbose, self.resume = config, tokenizer, verbose, resume
        self.run = RunLayout(run_dir)
        self.run_dir = self.run.path
        t = config.train
        check_available(t.loggers)  # a missing tracker package: one line, before any work
        # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
        self.strategy = strategy or make_strategy(config.runtime)
        self.replicas = self.strategy.num_replicas_in_sync
        self.multi_worker = config.runtime.strategy == "multi_worker" or (
            self.replicas > 1 and is_multi_worker(self.strategy)
        )
        self.chief = is_chief(self.strategy)
        self.record = RunRecorder(self.run, config, chief=self.chief, verbose=verbose)
        self.previous_config = self._check_run()
        self.initialized_from, self.init_from = None, init_from
        if init_from is not None and load_weights is None:
            raise ValueError("Trainer: init_from needs load_weights (the caller reads it)")
        self.load_weights = load_weights
        with self.strategy.scope():
            experts = self._build_model()
            self.optimizer = make_optimizer(t, self.model)
            self.expert_update = ep.ExpertUpdate(self.optimizer, experts) if experts else None
            self.average = WeightAverage(self.model, self.optimizer, t.ema_decay)
        self._open_checkpoint()
        self.step_fn = make_train_step(
            self.model,
            self.optimizer,
            clip_norm=t.clip_norm,
            accumulation=t.gradient_accumulation_steps,
            replicas=self.replicas,
            sparsity_threshold=t.sparsity_threshold,
            jit_compile=config.runtime.jit_compile,
            strategy=self.strategy,
            mtp_loss_weight=config.model.mtp_loss_weight,
            expert_update=self.expert_update,
        )
        self.tokens_per_step = t.batch_size * t.gradient_accumulation_steps * config.data.seq_len
        jit = config.runtime.jit_compile and not experts  # sharded: read whole, without XLA
        self.eval_step = make_eval_step(self.model, jit)

    # -- building ---------------------------------------------------------------------------
    def _check_run(self):
        """One-line errors before any work; returns a resumed run's previous config."""
        t = self.config.train
        self.stages = parse_stages(t, self.config.data, self.config.model.max_seq_len)
        for key, size in (("train.batch_size", t.batch_size),
                          *((f"train.stages[{i}]'s batch_size", s.batch_size)
                            for i, s in enumerate(self.stages))):  # fmt: skip
            if size % self.replicas:
                raise ConfigError(
                    f"{key} {size} is not divisible by the {self.replicas} replicas in sync "
                    "(each replica gets an equal share)"
                )
        previous = self.run.read_config() if self.resume else None
        ep.check_same_shards(previous, self.config)
        check_same_averaging(previous, self.config)
        if not self.resume:
            self.run.check_new()
        return previous

    def _build_model(self) -> list:
        """Builds the model (from `init_from`'s weights, with LoRA adapters when set) in
        the strategy's scope; returns the expert shards (`runtime.expert_parallel`)."""
        t = self.config.train
        if self.init_from is None:
            self.model = build_model(self.config, seed=t.seed)
        else:  # the source's weights first, then (LoRA) adapters on top of them
            self.model = build_model(self.config, seed=t.seed, lora=False)
            self.initialized_from = self.load_weights(self.model)
            if t.lora_rank:
                apply_lora(self.model, t.lora_rank, t.lora_alpha, t.lora_targets)
        return ep.shard_model_experts(self.model, self.config.runtime, self.replicas)

    def _open_checkpoint(self) -> None:
        """The run's checkpoint; a resumed run restores its newest readable one (and reads
        back its best so far, `train.keep_best`)."""
        extra = {**ep.checkpoint_objects(self.expert_update), **self.average.checkpoint_objects()}
        self.checkpoint = self.run.checkpoint(
            self.model,
            self.optimizer,
            self.config.train.keep_checkpoints,
            chief=self.chief,
            extra=extra,
        )
        self.checkpoint.log = self.record.log
        self.start_step, self.restored = 0, None
        if self.resume and self.checkpoint.latest:
            self.start_step = self.checkpoint.restore()
            self.restored = f"ckpt-{self.start_step}"  # checkpoints are numbered by step
            self.average.restore_trained()  # the model restored the average
        self.best = BestWeights(self.run, self.model, self.config.train.keep_best, chief=self.chief,
                                averaged=self.average.averaged, record=self.record)  # fmt: skip

    # -- data -------------------------------------------------------------------------------
    def train_batches(self):
        """The iterator of training batches from `start_step` on (`batches.staged_batches`)."""
        return batches.staged_batches(
            self.config, self.tokenizer, self.strategy, self.start_step, log=self.record.log
        )

    def validate(self) -> dict:
        """Loss, perplexity and accuracy on the validation split (with `train.ema_decay`,
        of the averaged weights)."""
        t = self.config.train
        dataset = batches.validation_batches(self.config, self.tokenizer)
        with self.average.averaged():
            return evaluate(self.model, dataset, max_batches=t.eval_batches, step_fn=self.eval_step)

    # -- the run directory --------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        """Writes the config and tokenizer of a new run; on resume, drops the metrics after
        the restored step, sets corrupt checkpoints aside and saves a changed config. Only
        called once the checkpoint is restored and the data checked; only the chief writes."""
        if self.chief and not self.resume:
            self.run.write_config(self.config)
            self.run.write_tokenizer(self.tokenizer)
            if self.init_from is not None:  # where the weights came from (`info`)
                t = self.config.train
                entry = {"method": "init_from", "source": str(self.init_from)}
                if t.lora_rank:
                    entry.update(lora_rank=t.lora_rank, lora_targets=list(t.lora_targets))
                self.run.write_history([entry])
        elif self.chief:
            self.checkpoint.set_aside_unreadable()
            self.record.metrics.truncate_after(self.start_step)
            if self.config != self.previous_config:
                self.run.write_config(self.config)
        self.record.open()

    def _announce(self) -> None:
        """Log lines before training: the resume, the initial weights, LoRA, warnings."""
        t = self.config.train
        if self.resume:
            if self.restored:
                self.record.log(
                    f"[resume] restored {self.run.checkpoint_dir / self.restored} "
                    f"(step {self.start_step} of {t.steps})"
                )
            else:
                self.record.log("[resume] the run has no checkpoint yet: starting at step 0")
            change = schedule_change(self.previous_config.train, t, self.start_step)
            if change:
                print(f"[resume] warning: {change}", file=sys.stderr, flush=True)
        if self.initialized_from:
            self.record.log(f"[init] weights from {self.initialized_from}")
        if t.lora_rank:
            self.record.log(describe_lora(self.model, t.lora_rank, t.lora_targets))
        short = warmup_warning(t)
        if short and self.start_step < t.steps:
            print(f"[train] warning: {short}", file=sys.stderr, flush=True)  # whatever verbose

    def _save(self, step: int) -> None:
        """Checkpoints `step` (the weight average as the model's weights); refuses
        non-finite weights, naming the last good checkpoint."""
        finite = all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.weights)
        if not finite:  # a finite loss can still be followed by an update to inf/NaN
            raise TrainingError(
                f"weights became non-finite at step {step}; stopped without saving. "
                f"Last good checkpoint: {self.last_saved or 'none'}"
            )
        started = time.perf_counter()
        # SIGTERM/Ctrl-C during the write: after it; the average saved as the model's weights
        with signals_deferred(), self.average.averaged():
            self.last_saved = self.checkpoint.save(step)
        self.record.checkpoint(step, self.last_saved, time.perf_counter() - started)

    # -- the run ----------------------------------------------------------------------------
    def train(self) -> dict:
        """Trains from `start_step` to `train.steps` (or the time limit); returns the
        summary (`step`, `checkpoint`, `train_tokens_per_sec`, `best_val_loss`, ...)."""
        wall_started = time.perf_counter()
        self._announce()
        if self.start_step >= self.config.train.steps:
            return self._already_complete()
        train_batches = self.train_batches()  # the data first: a DataError leaves no trace
        if self.config.train.eval_every:  # found before step 1, not after the last
            check_validation_data(self.config.data, self.tokenizer)
        self._prepare_run_dir()
        self._log_plan()
        loop = self._run_loop(train_batches, wall_started)
        return self._summarize(loop, wall_started)

    def _already_complete(self) -> dict:
        t = self.config.train
        self.record.log(
            f"[train] already complete (step {self.start_step} of {t.steps}): "
            f"{self.run_dir}; pass --set train.steps=N to train further"
        )
        done = {"step": self.start_step, "already_complete": True, "chief": self.chief}
        return {**done, "checkpoint": self.checkpoint.latest, **self.best.summary(),
                "train_tokens_per_sec": 0.0, "train_seconds": 0.0}  # fmt: skip

    def _log_plan(self) -> None:
        t = self.config.train
        info = describe_runtime(self.config.runtime, self.strategy)
        self.record.log(f"[runtime] {json.dumps(info)}")
        self.record.log(
            f"[train] steps {self.start_step}->{t.steps}, global batch {t.batch_size} x "
            f"{t.gradient_accumulation_steps} accumulation ({t.batch_size // self.replicas} per "
            f"replica x {self.replicas} replicas), {self.tokens_per_step} tokens/step, peak lr "
            f"{t.learning_rate}, params {self.model.count_params():,}"
        )

    def _run_loop(self, train_batches, wall_started: float) -> LoopResult:
        """`run_steps` with this run's rules; SIGTERM and Ctrl-C save, then re-raise."""
        t = self.config.train
        self.current_step, self.last_saved = self.start_step, self.checkpoint.latest
        # train.time_limit_minutes: a wall-clock budget from the start (a speedrun's guard)
        minutes = t.time_limit_minutes
        self.deadline = wall_started + 60.0 * minutes if minutes else None
        previous_handler = signal.signal(signal.SIGTERM, raise_interrupt)
        self.record.begin(self.model, self.tokens_per_step)
        try:
            loop = run_steps(self._step, train_batches, steps=t.steps, start=self.start_step,
                             on_step=self._after_step, should_stop=self._time_is_up)  # fmt: skip
            if loop.stopped:
                self._stop_early()
            return loop
        except NonFiniteLoss as e:
            raise TrainingError(
                f"{e}; stopped without saving. Last good checkpoint: {self.last_saved or 'none'}"
            ) from None
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            self.checkpoint.close()
            self.record.close(self.last_saved, done=self.current_step == t.steps)

    def _step(self, inputs, targets, weights) -> dict:
        """One training step; a worker lost mid-collective is a one-line `TrainingError`."""
        try:
            return self.step_fn(inputs, targets, weights)
        except LOST_WORKER_ERRORS as e:
            if not self.multi_worker:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(
                f"lost contact with another worker at step {self.current_step + 1} "
                f"({type(e).__name__}: {first[:200]}); restart every worker with --resume "
                "to continue from the last checkpoint"
            ) from None

    def _after_step(self, step: int, out: dict) -> None:
        """The run's rules after each step: record, checkpoint, then evaluate."""
        t = self.config.train
        self.current_step = step
        if self.stages:  # this step's tokens (the stage's batch shape)
            self.record.tokens_per_step = batches.tokens_per_step(self.config, self.stages, step - 1)  # noqa: E501  # fmt: skip
        self.record.step(step, out, learning_rate=lambda: current_learning_rate(self.optimizer))
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
            self._save(step)
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            self._evaluate(step)

    def _evaluate(self, step: int) -> None:
        """Validates `step`; keeps its weights when they are the best so far (`keep_best`)."""
        result = self.validate()
        self.record.evaluation(step, result)
        self.best.offer(step, result["loss"])

    def _time_is_up(self, step: int) -> str | None:
        """The stop rule of `train.time_limit_minutes`."""
        steps = self.config.train.steps
        if self.deadline is not None and step < steps and time.perf_counter() >= self.deadline:
            return "time_limit"
        return None

    def _stop_early(self) -> None:
        """After the time limit: the step saved, then evaluated (unless it just was)."""
        t, step = self.config.train, self.current_step
        self.record.log(f"[train] time limit ({t.time_limit_minutes:g} min) at step {step}")
        if step != self.checkpoint.step.numpy():
            self._save(step)
        if t.eval_every and step % t.eval_every:
            self._evaluate(step)

    def _save_on_interrupt(self) -> None:
        # A multi-worker save is collective: the other workers may be gone.
        step = self.current_step
        if (
            not self.multi_worker
            and step > self.start_step
            and step != self.checkpoint.step.numpy()
        ):
            self._save(step)
        self.record.log(f"[train] interrupted at step {step}; saved {self.last_saved}")

    def _summarize(self, loop: LoopResult, wall_started: float) -> dict:
        seconds, timed = loop.timed_seconds, range(loop.step - loop.timed_steps, loop.step)
        tokens = sum(batches.tokens_per_step(self.config, self.stages, s) for s in timed)
        summary = {
            "step": loop.step,
            "train_tokens_per_sec": tokens / seconds if seconds else 0,
            "train_seconds": seconds,
            "checkpoint": self.last_saved,
            "chief": self.chief,
            **self.best.summary(),
        }
        if loop.stopped:
            summary["stopped"] = loop.stopped
        summary = self.record.summary(summary)
        summary["wall_seconds"] = time.perf_counter() - wall_started
        return summary
