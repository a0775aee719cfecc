"""AdamW with decay exclusions and a warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import keras

from deepseek_tf.config.schema import TrainConfig

# Variable names (regexes on the last path component) that get no weight decay:
# norm scales, biases, embeddings and the relative-position bias table.
NO_DECAY_NAMES = ("scale", "bias", "embeddings", "table")


def learning_rate_schedule(t: TrainConfig) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to `min_learning_rate`."""
    decay_steps = max(t.steps - t.warmup_steps, 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if t.warmup_steps else t.learning_rate,
        decay_steps=decay_steps,
        alpha=t.min_learning_rate / t.learning_rate,
        warmup_target=t.learning_rate if t.warmup_steps else None,
        warmup_steps=t.warmup_steps,
    )


def make_optimizer(t: TrainConfig, model: keras.Model) -> keras.optimizers.Optimizer:
    """AdamW (+ loss scaling for float16), built for `model`'s trainable variables.

    Call inside the distribution strategy's scope. Global-norm clipping is done
    by the optimizer (`global_clipnorm`); gradient accumulation by the trainer,
    so that one optimizer step is one schedule step.
    """
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(t),
        weight_decay=t.weight_decay,
        beta_1=t.beta1,
        beta_2=t.beta2,
        epsilon=1e-8,
        global_clipnorm=t.clip_norm or None,
    )
    optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
    if t.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)
