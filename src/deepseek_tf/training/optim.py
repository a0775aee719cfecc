"""Keras' AdamW, Lion or Muon with decay exclusions and a warm-up + cosine schedule."""

from __future__ import annotations

import keras

from deepseek_tf.config.schema import TrainConfig
from deepseek_tf.layers.expert_shards import ExpertShardVariable

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


SCHEDULE_KEYS = ("steps", "warmup_steps", "learning_rate", "min_learning_rate")


def schedule_change(old: TrainConfig, new: TrainConfig, step: int) -> str | None:
    """What a resume at `step` with `new` changes in the learning rate, or None."""
    changed = [k for k in SCHEDULE_KEYS if getattr(old, k) != getattr(new, k)]
    if not changed or not step:
        return None
    before = float(learning_rate_schedule(old)(step))
    after = float(learning_rate_schedule(new)(step))
    what = ", ".join(f"train.{k} {getattr(old, k)} -> {getattr(new, k)}" for k in changed)
    return (
        f"the learning-rate schedule changed ({what}): at step {step} the learning rate "
        f"was {before:.3g} and is now {after:.3g}; warm-up and cosine decay are recomputed "
        f"for {new.steps} steps"
    )


def make_optimizer(t: TrainConfig, model: keras.Model) -> keras.optimizers.Optimizer:
    """`train.optimizer` (+ loss scaling for float16), built for `model`'s trainable variables.

    Call inside the distribution strategy's scope. `global_clipnorm` carries
    `train.clip_norm` to the training step, which clips by the true global norm itself
    (`make_train_step`); gradient accumulation is the step's too, so that one optimizer
    step is one schedule step. `train.ema_decay` turns on Keras' moving average of the
    weights (`training.weight_average` uses it). Muon orthogonalises the updates
    of 2-D weights and keeps AdamW (same betas) for the rest: norms, embeddings and
    the stacked (3-D) expert weights, which Keras' Muon leaves to AdamW.
    """
    common = dict(
        learning_rate=learning_rate_schedule(t),
        weight_decay=t.weight_decay,
        global_clipnorm=t.clip_norm or None,
        # Keras' own EMA of the weights (training.weight_average swaps it in)
        use_ema=bool(t.ema_decay),
        ema_momentum=t.ema_decay or 0.99,  # 0.99: Keras' default, unused when off
    )
    if t.optimizer == "lion":
        optimizer = keras.optimizers.Lion(beta_1=t.beta1, beta_2=t.beta2, **common)
    elif t.optimizer == "muon":
        optimizer = keras.optimizers.Muon(
            adam_beta_1=t.beta1,
            adam_beta_2=t.beta2,
            adam_weight_decay=t.weight_decay,
            epsilon=1e-8,
            # an untied output head and the relative-position bias table stay with AdamW
            exclude_layers=["lm_head", "table"],
            **common,
        )
    else:
        optimizer = keras.optimizers.AdamW(beta_1=t.beta1, beta_2=t.beta2, epsilon=1e-8, **common)
    optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY_NAMES))
    if t.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(optimized_variables(model))
    return optimizer


def optimized_variables(model: keras.Model) -> list:
    """The variables `make_optimizer`'s optimizer updates: the trainable ones but the
    expert shards (runtime.expert_parallel), which are updated per replica (ExpertUpdate)."""
    return [v for v in model.trainable_variables if not isinstance(v, ExpertShardVariable)]


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)
