"""Repetition penalties: OpenAI's presence and frequency penalties and vLLM's repetition
penalty, applied inside the one decode step (`DecodeLoop.token_step`).

For each row, before sampling:

1. repetition (`r`, CTRL's penalty as vLLM and `transformers` apply it): the logit of every
   token seen in the prompt or the output so far is divided by `r` if positive and
   multiplied by `r` if not (`r > 1` discourages repeats, `r = 1` is off);
2. frequency and presence (OpenAI): `logit -= frequency * count + presence * (count > 0)`,
   where `count` is how often the token was generated (the prompt does not count).

The state a row carries is `counts` `(B, V)` float32 (generated tokens) and `seen` `(B, V)`
bool (prompt and generated); the step updates both with the token it samples (never with a
forced prompt token, which `seen` already holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from deepseek_tf.generation.sampler import SamplingError, checked_number

MAX_PENALTY = 2.0  # OpenAI's bound on presence and frequency penalties
MAX_REPETITION = 10.0


@dataclass(frozen=True)
class Penalties:
    """Checked penalty settings of one row (see `check_penalties`)."""

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0

    @property
    def active(self) -> bool:
        return (self.presence, self.frequency, self.repetition) != (0.0, 0.0, 1.0)


def check_penalties(presence=0.0, frequency=0.0, repetition=1.0) -> Penalties:
    """`presence_penalty` and `frequency_penalty` in [-2, 2] (OpenAI's range),
    `repetition_penalty` in (0, 10]; None takes the neutral value.

    Raises:
        SamplingError: naming the setting.
    """
    presence = checked_number(0.0 if presence is None else presence, "presence_penalty", -2.0, 2.0)
    frequency = checked_number(0.0 if frequency is None else frequency, "frequency_penalty", -2, 2)
    repetition = checked_number(1.0 if repetition is None else repetition, "repetition_penalty", 0,
                         MAX_REPETITION)  # fmt: skip
    if repetition == 0.0:
        raise SamplingError("repetition_penalty must be > 0 (1: off)", "repetition_penalty")
    return Penalties(presence, frequency, repetition)


def initial_state(prompts: Sequence[Sequence[int]], batch: int, vocab: int):
    """`(counts, seen)` numpy arrays `(batch, vocab)` for rows starting after `prompts`."""
    counts = np.zeros((batch, vocab), np.float32)
    seen = np.zeros((batch, vocab), bool)
    for row, prompt in enumerate(prompts):
        seen[row, np.asarray(prompt, np.int64)] = True
    return counts, seen


def settings_arrays(rows: Sequence[Penalties], batch: int) -> tuple[np.ndarray, ...]:
    """`(presence, frequency, repetition)` `(batch,)` float32 arrays (padding neutral)."""
    pad = [Penalties()] * (batch - len(rows))
    rows = [*rows, *pad]
    return tuple(np.asarray([getattr(p, k) for p in rows], np.float32)
                 for k in ("presence", "frequency", "repetition"))  # fmt: skip


def apply_penalties(logits, penalties):
    """`(B, V)` logits penalised by `penalties` = `(presence (B,), frequency (B,),
    repetition (B,), counts (B, V), seen (B, V))`."""
    presence, frequency, repetition, counts, seen = penalties
    logits = tf.cast(logits, tf.float32)
    r = tf.cast(repetition, tf.float32)[:, None]
    logits = tf.where(seen, tf.where(logits > 0, logits / r, logits * r), logits)
    used = tf.cast(counts > 0, tf.float32)
    return logits - frequency[:, None] * counts - presence[:, None] * used


def record(penalties, token, sampled):
    """`penalties` with each row's `token` `(B,)` counted where `sampled` `(B,)` is true."""
    presence, frequency, repetition, counts, seen = penalties
    hit = tf.one_hot(token, tf.shape(counts)[-1], dtype=tf.float32)  # (B, V)
    hit = hit * tf.cast(sampled, tf.float32)[:, None]
    return presence, frequency, repetition, counts + hit, tf.logical_or(seen, hit > 0)
