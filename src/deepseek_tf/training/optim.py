"""Keras' AdamW, Lion or Muon with decay exclusions and a warm-up + cosine schedule.

Which weights decay, and which Muon orthogonalises, is decided by rank and by what the
model declares (`CausalLM.weight_roles`), never by variable names (nanoGPT's rule):
matrices and stacks (rank >= 2) decay, norm scales and biases (rank < 2) do not, nor do
the tables the model looks up by index (token embedding, relative-position biases).
Muon takes the 2-D hidden matrices; AdamW the rest, the tables and an untied output head.
"""

from __future__ import annotations

import re
import weakref

import keras
import tensorflow as tf

from deepseek_tf.config.schema import TrainConfig
from deepseek_tf.layers.expert_shards import ExpertShardVariable


@keras.saving.register_keras_serializable(package="deepseek_tf")
class OncePerStep(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule`, computed once per traced step.

    Keras' optimizers read their learning rate once per variable they decay (AdamW's
    weight decay, Muon's), so a traced step held one copy of the schedule's ops per
    matrix: ~1 s of a tiny model's 5 s trace. Inside a traced function this returns the
    tensor it computed for the same `step` in the same graph (the optimizer's
    `iterations` moves only after every variable is updated); eagerly it recomputes.

    Args:
        schedule: a `LearningRateSchedule`.
    """

    def __init__(self, schedule):
        self.schedule = schedule
        self._per_graph = weakref.WeakKeyDictionary()  # graph -> {id(step): (step, lr)}

    def __call__(self, step):
        if not tf.inside_function():
            return self.schedule(step)
        seen = self._per_graph.setdefault(tf.compat.v1.get_default_graph(), {})
        if id(step) not in seen:
            seen[id(step)] = (step, self.schedule(step))  # the step kept: its id stays its own
        return seen[id(step)][1]

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]))


def learning_rate_schedule(t: TrainConfig) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to `min_learning_rate`."""
    decay_steps = max(t.steps - t.warmup_steps, 1)
    cosine = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if t.warmup_steps else t.learning_rate,
        decay_steps=decay_steps,
        alpha=t.min_learning_rate / t.learning_rate,
        warmup_target=t.learning_rate if t.warmup_steps else None,
        warmup_steps=t.warmup_steps,
    )
    return OncePerStep(cosine)


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


def warmup_warning(t: TrainConfig) -> str | None:
    """A one-line warning when the warm-up takes more than half of the run, or None."""
    if 2 * t.warmup_steps <= t.steps:
        return None
    peak = f"only at step {t.warmup_steps}" if t.warmup_steps <= t.steps else "never"
    return (
        f"train.warmup_steps {t.warmup_steps} is more than half of train.steps {t.steps}: "
        f"the learning rate reaches its peak {t.learning_rate:g} {peak}; set "
        f"train.warmup_steps lower (e.g. {t.steps // 10})"
    )


def no_decay_variables(variables, tables=()) -> list:
    """The `variables` without weight decay: rank < 2 (norm scales, biases) and `tables`
    (what the model looks up by index, `CausalLM.weight_roles()["tables"]`)."""
    declared = {id(v) for v in tables}
    return [v for v in variables if len(v.shape) < 2 or id(v) in declared]


def exact_paths(variables) -> list[str]:
    """Regexes matching exactly these variables' paths (Keras' Muon takes regexes)."""
    return [f"^{re.escape(v.path)}$" for v in variables]


def make_optimizer(
    t: TrainConfig, model: keras.Model, *, moving_average: bool = True
) -> keras.optimizers.Optimizer:
    """`train.optimizer` (+ loss scaling for float16), built for `model`'s trainable variables.

    Call inside the distribution strategy's scope. The optimizer never clips: the
    training step does, by the true global norm (`make_train_step(clip_norm=...)`);
    gradient accumulation is the step's too, so that one optimizer step is one schedule
    step. `train.ema_decay` turns on Keras' moving average of the weights
    (`training.weight_average` uses it) unless `moving_average=False` (a fine-tune kept
    in memory). Muon orthogonalises the updates of 2-D hidden matrices and keeps AdamW
    (same betas) for the rest: norms, tables, an untied output head and the stacked
    (3-D) expert weights, which Keras' Muon leaves to AdamW by rank.

    Args:
        t: the train section (optimizer, schedule, betas, weight decay, precision).
        model: the `CausalLM` (its `weight_roles()` names its tables and head).
        moving_average: False keeps no moving average whatever `t.ema_decay` says.

    Returns:
        The built optimizer (a `LossScaleOptimizer` around it under mixed_float16).
    """
    average = bool(t.ema_decay) and moving_average
    common = dict(
        learning_rate=learning_rate_schedule(t),
        weight_decay=t.weight_decay,
        # Keras' own EMA of the weights (training.weight_average swaps it in)
        use_ema=average,
        ema_momentum=t.ema_decay if average else 0.99,  # 0.99: Keras' default, unused
    )
    roles = model.weight_roles()
    if t.optimizer == "lion":
        optimizer = keras.optimizers.Lion(beta_1=t.beta1, beta_2=t.beta2, **common)
    elif t.optimizer == "muon":
        optimizer = keras.optimizers.Muon(
            adam_beta_1=t.beta1,
            adam_beta_2=t.beta2,
            adam_weight_decay=t.weight_decay,
            epsilon=1e-8,
            # Muon's rank rule (not 2-D: AdamW) plus the model's tables and output head
            exclude_embeddings=False,
            exclude_layers=exact_paths(roles["tables"] + roles["output_head"]),
            **common,
        )
    else:
        optimizer = keras.optimizers.AdamW(beta_1=t.beta1, beta_2=t.beta2, epsilon=1e-8, **common)
    variables = optimized_variables(model)
    optimizer.exclude_from_weight_decay(var_list=no_decay_variables(variables, roles["tables"]))
    if t.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return optimizer


def optimized_variables(model: keras.Model) -> list:
    """The variables `make_optimizer`'s optimizer updates: the trainable ones but the
    expert shards (runtime.expert_parallel), which are updated per replica (ExpertUpdate)."""
    return [v for v in model.trainable_variables if not isinstance(v, ExpertShardVariable)]


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)
