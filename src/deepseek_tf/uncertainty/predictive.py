"""Where the samples of a predictive distribution come from.

A `Predictor` turns a batch of token ids into `(S, B, T, V)` sampled next-token
probabilities, by one of four methods:

- `"model"`: the run's own head -- one softmax for a categorical head, `samples` draws
  of the latent for a gaussian head (`CausalLM.sample_logits`);
- `"mc_dropout"`: `samples` forward passes with dropout on (Monte Carlo dropout; only
  for models trained with dropout);
- `"ensemble"`: one softmax per member run (deep ensembles; the members share a
  tokenizer);
- temperature scaling needs no method of its own: a calibrated run divides its logits by
  `calibration.logit_temperature` (`deepseek-tf calibrate`), so every method sees it.

The predictive distribution is the mean of the sampled softmaxes (`metrics.token_stats`).
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.errors import InputError, check_count
from deepseek_tf.rundir import load_run

METHODS = ("model", "mc_dropout", "ensemble")


class Predictor:
    """Sampled next-token probabilities of a model, or of an ensemble of models.

    Args:
        models: the model (or, for `"ensemble"`, the member models).
        method: one of `METHODS`.
        samples: samples per token (gaussian head, MC dropout; ignored otherwise).
        seed: seed of the gaussian head's samples (each batch derives its own).
        jit_compile: compile with XLA.

    Raises:
        InputError: MC dropout on a model without dropout, an ensemble of one, fewer
            than one sample.
    """

    def __init__(
        self, models, method: str = "model", samples: int = 8, seed: int = 0, jit_compile=True
    ):
        models = list(models) if isinstance(models, (list, tuple)) else [models]
        if method not in METHODS:
            raise InputError(f"unknown uncertainty method {method!r} ({', '.join(METHODS)})")
        check_count("samples", samples, 1)
        if method == "ensemble" and len(models) < 2:
            raise InputError("an ensemble needs at least two runs")
        if method != "ensemble" and len(models) != 1:
            raise InputError(f"method {method!r} takes one run, got {len(models)}")
        if method == "mc_dropout" and not models[0].dropout:
            raise InputError(
                "--mc-samples: Monte Carlo dropout needs a model trained with dropout "
                "(model.dropout > 0); this one has none, so its passes would all agree"
            )
        self.models, self.method, self.seed = models, method, seed
        gaussian = models[0].gaussian_head is not None
        self.samples = {"ensemble": len(models), "mc_dropout": samples}.get(
            method, samples if gaussian else 1
        )
        if method == "mc_dropout":
            _seed_dropout(models[0], seed)
        self._fn = tf.function(
            self._probs, jit_compile=jit_compile, reduce_retracing=True, autograph=False
        )

    def _probs(self, token_ids, batch_index):
        if self.method == "ensemble":
            logits = [model(token_ids, training=False) for model in self.models]
            return tf.nn.softmax(tf.stack(logits), axis=-1)  # (S, B, T, V)
        model = self.models[0]
        if self.method == "mc_dropout":
            logits = [model(token_ids, training=True) for _ in range(self.samples)]
            return tf.nn.softmax(tf.stack(logits), axis=-1)  # (S, B, T, V)
        hidden = model.hidden_states(token_ids, training=False)  # (B, T, C)
        seed = tf.stack([tf.constant(self.seed, tf.int32), tf.cast(batch_index, tf.int32)])
        logits, _ = model.sample_logits(hidden, self.samples, seed)  # (S, B, T, V)
        return tf.nn.softmax(logits, axis=-1)

    def __call__(self, token_ids, batch_index: int = 0):
        """`(S, B, T, V)` float32 probabilities of `(B, T)` token ids."""
        return self._fn(tf.convert_to_tensor(token_ids), tf.constant(batch_index, tf.int32))


def _seed_dropout(model, seed: int) -> None:
    """Restart every random-state variable of `model` (its dropout layers' generators) from
    `seed`, so that the same seed gives the same Monte Carlo dropout masks in any process."""
    states = [v for v in model.variables if "seed_generator_state" in v.path]
    for i, state in enumerate(states):
        state.assign(tf.constant([seed * 1_000_003 + i, 0], dtype=state.dtype))


def _same_vocabulary(tokenizer, other) -> bool:
    """True when `other` maps every id to the same text as `tokenizer`."""
    size = tokenizer.vocab_size
    return (
        other is not None
        and type(other) is type(tokenizer)
        and other.vocab_size == size
        and [other.decode([i]) for i in range(size)] == [tokenizer.decode([i]) for i in range(size)]
    )


def load_ensemble(model, tokenizer, runs, *, run_dir) -> list:
    """`[model, *the models of runs]`: the members of a deep ensemble around `run_dir`'s
    `model`, each checked to share its tokenizer and vocabulary.

    Raises:
        InputError: a member whose tokenizer or vocabulary differs (named as `--ensemble`).
    """
    members = [model]
    for run in runs:
        member, member_tokenizer = load_run(run)
        if not _same_vocabulary(tokenizer, member_tokenizer):
            raise InputError(
                f"--ensemble {run}: its tokenizer differs from {run_dir}'s; an ensemble "
                "averages distributions over one vocabulary"
            )
        if member.vocab_size != model.vocab_size:
            raise InputError(
                f"--ensemble {run}: vocabulary {member.vocab_size} is not {model.vocab_size}"
            )
        members.append(member)
    return members


def make_predictor(
    model, tokenizer, *, run_dir, samples: int = 8, mc_samples=None, ensemble=()
) -> Predictor:
    """The `Predictor` `eval --uncertainty` uses: a deep ensemble of `run_dir` and the runs
    of `ensemble` when given, else Monte Carlo dropout with `mc_samples` passes when given,
    else the model's own head (`samples` draws of a gaussian head's latent)."""
    if ensemble:
        return Predictor(load_ensemble(model, tokenizer, ensemble, run_dir=run_dir), "ensemble")
    if mc_samples is not None:
        return Predictor(model, "mc_dropout", samples=mc_samples)
    return Predictor(model, "model", samples=samples)
