"""A short fine-tuning loop shared by the compression methods that train.

Single device, AdamW with a linear warm-up and cosine decay, next-token loss plus
an optional extra term (distillation) and a hook after every step (pruning masks).
Kept apart from `training.Trainer`, which owns run directories, resumption and
distribution: a compression step starts from weights in memory and writes one run.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf
from keras import ops

from deepseek_tf.data.pipeline import make_eval_dataset, make_train_dataset
from deepseek_tf.training.evaluate import evaluate, token_losses
from deepseek_tf.training.optim import make_optimizer
from deepseek_tf.training.step import weighted_mean


def finetune(
    model,
    config,
    tokenizer,
    *,
    steps: int,
    learning_rate: float,
    extra_loss=None,
    after_step=None,
    start_batch: int = 0,
    log=print,
) -> list[float]:
    """Trains `model` for `steps` steps on the run's training split; returns the losses.

    Args:
        model: a built `CausalLM` (trained in place).
        config: the run's config (data, batch size, clipping, weight decay).
        tokenizer: the run's tokenizer.
        steps: optimizer steps (0 does nothing).
        learning_rate: peak learning rate (warm-up over 10% of the steps, cosine to 10%).
        extra_loss: `fn(inputs, logits, weights) -> scalar` added to the objective.
        after_step: `fn(step)` called eagerly after each update.
        start_batch: first batch of the training stream (continue where training ended).
        log: printer of a progress line every ~10% of the steps (None: silent).
    """
    if steps <= 0:
        return []
    t = dataclasses.replace(
        config.train,
        steps=steps,
        learning_rate=learning_rate,
        min_learning_rate=learning_rate * 0.1,
        warmup_steps=max(1, steps // 10),
        gradient_accumulation_steps=1,
    )
    optimizer = make_optimizer(t, model)
    # MTP modules get no gradient from the next-token loss: fine-tuning leaves them be.
    variables = [v for v in model.trainable_variables if "/mtp_" not in f"/{v.path}"]

    def step_fn(inputs, targets, weights):
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True)  # (B, T, V)
            loss = weighted_mean(token_losses(logits, targets), weights)
            objective = loss
            if extra_loss is not None:
                objective = objective + extra_loss(inputs, logits, weights)
        grads = tape.gradient(objective, variables)
        optimizer.apply(grads, variables)
        return loss, objective

    compiled = tf.function(step_fn, jit_compile=config.runtime.jit_compile)
    ds = make_train_dataset(config.data, tokenizer, t.batch_size, start_batch=start_batch)
    losses = []
    every = max(1, steps // 10)
    for step, (inputs, targets, weights) in enumerate(ds.take(steps), start=1):
        loss, objective = compiled(inputs, targets, weights)
        losses.append(float(loss))
        if not math.isfinite(float(objective)):
            from deepseek_tf.errors import TrainingError

            raise TrainingError(f"fine-tuning loss became {float(objective)} at step {step}")
        if after_step is not None:
            after_step(step)
        if log and (step % every == 0 or step == steps):
            log(f"[finetune] step {step}/{steps} loss {float(loss):.4f}")
    return losses


def validation_loss(model, config, tokenizer, max_batches: int = 0) -> float:
    """Mean next-token loss on the run's validation split."""
    ds = make_eval_dataset(config.data, tokenizer, config.train.batch_size, split="val")
    return evaluate(model, ds, max_batches=max_batches, jit_compile=config.runtime.jit_compile)[
        "loss"
    ]


def distillation_term(teacher_logits, student_logits, weights, temperature: float):
    """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, weighted mean over tokens."""
    t = ops.cast(teacher_logits, "float32") / temperature
    s = ops.cast(student_logits, "float32") / temperature
    teacher_logp = ops.log_softmax(t, axis=-1)
    kl = ops.sum(ops.exp(teacher_logp) * (teacher_logp - ops.log_softmax(s, axis=-1)), axis=-1)
    return weighted_mean(kl, weights) * temperature**2
