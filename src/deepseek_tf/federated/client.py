"""A client's round: start from the global weights, take `local_steps` optimizer steps on
its own data with the one training step and loop, return the update.

Clients are stateless between rounds (cross-device federated learning): the optimizer's
moments start from zero every round and the learning rate is constant
(`train.learning_rate`). The local data position moves on by `local_steps` batches a
round, so a resumed run sees exactly what an uninterrupted one saw. FedProx adds
`mu / 2 * ||w - w_global||^2` through the step's `extra_loss` hook.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.config.loader import update_config
from deepseek_tf.data.pipeline import make_step_dataset
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.loop import run_steps
from deepseek_tf.training.optim import make_optimizer
from deepseek_tf.training.step import make_train_step


def float_weights(model) -> list:
    """The variables federated averaging moves: every float weight (trainable or not, e.g.
    the MoE routers' balancing biases); integer states (seed generators) stay local."""
    return [v for v in model.weights if keras.backend.is_float_dtype(v.dtype)]


class LocalTrainer:
    """Runs clients' rounds on one model (reused for every client of a process).

    Args:
        config: the run's config (model, data and the clients' `train` settings).
        vocab_size: the tokenizer's vocabulary.
        tokenizer: the run's tokenizer.
        proximal_mu: FedProx's `mu` (0: plain local training).
    """

    def __init__(self, config, tokenizer, proximal_mu: float = 0.0):
        f, t = config.federated, config.train
        self.config, self.tokenizer = config, tokenizer
        constant = {"steps": f.local_steps, "warmup_steps": 0, "min_learning_rate": t.learning_rate,
                    "stages": ()}  # fmt: skip
        self.train = update_config(config, train=constant).train  # a constant learning rate
        self.model = build_model(config, seed=t.seed)
        self.weights = float_weights(self.model)
        self.optimizer = make_optimizer(self.train, self.model)
        self.anchor = [tf.Variable(w, trainable=False) for w in self.weights]  # w_global
        extra = self._proximal(proximal_mu) if proximal_mu > 0 else None
        self.step = make_train_step(
            self.model,
            self.optimizer,
            clip_norm=t.clip_norm,
            accumulation=t.gradient_accumulation_steps,
            sparsity_threshold=t.sparsity_threshold,
            jit_compile=config.runtime.jit_compile,
            mtp_loss_weight=config.model.mtp_loss_weight,
            extra_loss=extra,
        )

    def _proximal(self, mu: float):
        pairs = [(w, a) for w, a in zip(self.weights, self.anchor) if w.trainable]

        def proximal(inputs, targets, weights, logits):
            squares = [tf.reduce_sum(tf.square(w - a)) for w, a in pairs]
            return 0.5 * mu * tf.add_n(squares)

        return proximal

    def set_weights(self, values: list[np.ndarray]) -> None:
        for variable, anchor, value in zip(self.weights, self.anchor, values):
            variable.assign(value)
            anchor.assign(value)

    def get_weights(self) -> list[np.ndarray]:
        return [np.asarray(v.numpy(), np.float32) for v in self.weights]

    def _reset_optimizer(self) -> None:
        for variable in self.optimizer.variables:  # moments and the iteration count
            variable.assign(tf.zeros_like(variable))

    def run(self, global_weights: list[np.ndarray], client_file: str, round_index: int) -> dict:
        """One round of one client: `{"update": [w_local - w_global], "loss", "tokens"}`."""
        self.set_weights(global_weights)
        self._reset_optimizer()
        t = self.train
        data_cfg = update_config(self.config, data={"files": [client_file]}).data
        ds = make_step_dataset(
            data_cfg,
            self.tokenizer,
            t.batch_size,
            accumulation=t.gradient_accumulation_steps,
            start_step=round_index * t.steps,
        )
        # a diverged client's update is rejected by the aggregation (federated.rounds)
        losses = run_steps(self.step, ds, steps=t.steps, stop_on_nonfinite=False).losses
        update = [local - glob for local, glob in zip(self.get_weights(), global_weights)]
        tokens = t.steps * t.batch_size * t.gradient_accumulation_steps * self.config.data.seq_len
        loss = float(np.mean(losses)) if losses else math.nan
        return {"update": update, "loss": loss, "tokens": tokens}
