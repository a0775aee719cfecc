"""Training a model held in memory with the one training step: compression fine-tuning
(prune, QAT, low-rank) and distillation.

The step is `training.step.make_train_step` and the loop `training.loop.run_steps`, the
trainer's own: next-token, MTP and MoE balance losses, loss scaling under float16, the
auxiliary-loss-free bias update, clipping, plus the caller's extra loss (distillation) and
after-update hook (pruning masks). What this adds is only what `Trainer` does not fit: the
weights start in memory and the caller writes one run at the end (no checkpoints, no
resumption).
"""

from __future__ import annotations

from deepseek_tf.config.loader import update_config
from deepseek_tf.config.schema import TrainConfig
from deepseek_tf.data.pipeline import make_eval_dataset, make_step_dataset
from deepseek_tf.errors import TrainingError
from deepseek_tf.training.evaluate import evaluate
from deepseek_tf.training.loop import NonFiniteLoss, run_steps
from deepseek_tf.training.optim import make_optimizer
from deepseek_tf.training.step import make_train_step


def finetune_schedule(config, steps: int, learning_rate: float) -> TrainConfig:
    """The run's train section for a short fine-tune: `steps` optimizer steps, warm-up over
    10% of them, cosine decay from `learning_rate` to a tenth of it."""
    changes = {
        "steps": steps,
        "learning_rate": learning_rate,
        "min_learning_rate": learning_rate * 0.1,
        "warmup_steps": max(1, steps // 10),
        "stages": (),  # a staged run's stages were its training's, not this fine-tune's
    }
    return update_config(config, train=changes).train


def train_in_memory(
    model,
    config,
    tokenizer,
    train: TrainConfig,
    *,
    extra_loss=None,
    hard_loss_weight: float = 1.0,
    after_update=None,
    on_step=None,
    start_step: int = 0,
    log=print,
    label: str = "finetune",
) -> list[float]:
    """Trains `model` in place for `train.steps` steps on the run's training split.

    Args:
        model: a built `CausalLM`.
        config: the run's config (data, precision, MTP weight, XLA).
        tokenizer: the run's tokenizer.
        train: the schedule, batch size, accumulation, clipping and weight decay used.
        extra_loss, hard_loss_weight, after_update: see `make_train_step`.
        on_step: `fn(step)` called eagerly after each step (e.g. pruning events).
        start_step: first step of the training stream (continue where training ended).
        log: printer of a progress line every ~10% of the steps (None: silent).
        label: the progress lines' tag.

    Returns:
        The next-token loss of every step.
    """
    if train.steps <= 0:
        return []
    # a short recovery fine-tune keeps the weights it trains, not a moving average
    optimizer = make_optimizer(train, model, moving_average=False)
    step_fn = make_train_step(
        model,
        optimizer,
        clip_norm=train.clip_norm,
        accumulation=train.gradient_accumulation_steps,
        sparsity_threshold=train.sparsity_threshold,
        jit_compile=config.runtime.jit_compile,
        mtp_loss_weight=config.model.mtp_loss_weight,
        hard_loss_weight=hard_loss_weight,
        extra_loss=extra_loss,
        after_update=after_update,
    )
    batches = make_step_dataset(
        config.data,
        tokenizer,
        train.batch_size,
        accumulation=train.gradient_accumulation_steps,
        start_step=start_step,
    )
    every = max(1, train.steps // 10)

    def after_step(step: int, out: dict) -> None:
        if on_step is not None:
            on_step(step)
        if log and (step % every == 0 or step == train.steps):
            more = f" extra {float(out['extra_loss']):.4f}" if "extra_loss" in out else ""
            log(f"[{label}] step {step}/{train.steps} loss {float(out['loss']):.4f}{more}")

    try:
        return run_steps(step_fn, batches, steps=train.steps, on_step=after_step).losses
    except NonFiniteLoss as e:
        raise TrainingError(f"{label} {e}") from None


def finetune(
    model,
    config,
    tokenizer,
    *,
    steps: int,
    learning_rate: float,
    after_update=None,
    on_step=None,
    start_step: int = 0,
    log=print,
) -> list[float]:
    """A short fine-tune of `model` in place (see `finetune_schedule`).

    Args:
        model: a built `CausalLM`.
        config: its config (data, precision, the train section the schedule starts from).
        tokenizer: the run's tokenizer.
        steps: optimizer steps (0: none).
        learning_rate: the peak learning rate.
        after_update, on_step, start_step, log: see `train_in_memory`.

    Returns:
        The next-token loss of every step.

    Examples:
        losses = finetune(model, config, tokenizer, steps=50, learning_rate=1e-4, log=None)
    """
    if steps <= 0:
        return []
    return train_in_memory(
        model,
        config,
        tokenizer,
        finetune_schedule(config, steps, learning_rate),
        after_update=after_update,
        on_step=on_step,
        start_step=start_step,
        log=log,
    )


def validation_loss(model, config, tokenizer, max_batches: int = 0) -> float:
    """Mean next-token loss on the run's validation split (`max_batches`: 0 for all)."""
    ds = make_eval_dataset(config.data, tokenizer, config.train.batch_size, split="val")
    return evaluate(model, ds, max_batches=max_batches, jit_compile=config.runtime.jit_compile)[
        "loss"
    ]
