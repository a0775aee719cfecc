"""Next-token sampling: greedy, temperature, top-k, top-p -- the one sampler of every
decoding path (`generate`, the server, the SavedModel and LiteRT signatures).

Randomness is keyed by each row's seed and the position of the token being sampled, never
by the batch: the same prompt, seed and settings give the same tokens alone or batched,
eagerly or in any compiled loop. The noise is a counter-based hash (murmur3's finaliser)
rather than `tf.random.stateless_*`, which draws for a whole tensor from one seed and so
would tie a row's draws to its batch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import InputError

NEG_INF = -1e9
MAX_TEMPERATURE = 2.0  # OpenAI's bound; above it text is noise
SEED_MODULUS = 2**31  # seeds are reduced to an int32
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for `logit_bias` values
MAX_BIASED_TOKENS = 300  # OpenAI's limit on `logit_bias` entries


class SamplingError(InputError):
    """A sampling setting out of range; `param` names it (`temperature`, `top_p`, ...)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Checked sampling settings (see `check_sampling`).

    Attributes:
        temperature: 0 is greedy; up to `MAX_TEMPERATURE`.
        top_k: keep the `k` most likely tokens (0: all).
        top_p: keep the smallest set whose probability reaches `p` (1: all).
        seed: a non-negative int32 (any int is reduced modulo 2**31).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def checked_number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(f"{name} must be a number, got {value!r}", name)
    if isinstance(value, int):  # an int of any size: compare without converting to float
        if not low <= value <= high:
            shown = str(value) if len(str(value)) < 40 else f"{str(value)[:20]}... "
            raise SamplingError(f"{name} must be between {low:g} and {high:g}, got {shown}", name)
        return float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise SamplingError(f"{name} must be between {low:g} and {high:g}, got {value}", name)
    return float(value)


def _integer(value, name: str) -> int:
    if isinstance(value, bool):
        raise SamplingError(f"{name} must be an integer, got {value!r}", name)
    try:
        return operator.index(value)
    except TypeError:
        raise SamplingError(f"{name} must be an integer, got {value!r}", name) from None


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, seed=0) -> SamplingParams:
    """The one set of rules for sampling settings (CLI, Python API and HTTP server).

    `temperature` in [0, 2], `top_k` >= 0, `top_p` in [0, 1] (0: greedy), `seed` any int.

    Raises:
        SamplingError: naming the setting.
    """
    temperature = checked_number(temperature, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = checked_number(top_p, "top_p", 0.0, 1.0)
    top_k = _integer(top_k, "top_k")
    if top_k < 0:
        raise SamplingError(f"top_k must be >= 0 (0: no top-k filter), got {top_k}", "top_k")
    seed = _integer(seed, "seed") % SEED_MODULUS
    if top_p == 0.0:
        temperature = 0.0  # an empty nucleus: greedy
    return SamplingParams(temperature, min(top_k, 2**31 - 1), top_p, seed)


def check_logit_bias(logit_bias, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` (`{token id (int or decimal string): bias in [-100, 100]}`, as OpenAI
    takes it) as sorted `(id, bias)` pairs; None or `{}` gives `()`.

    Raises:
        SamplingError: a malformed map, an id outside `[0, vocab_size)`, a bias out of range.
    """
    if logit_bias is None:
        return ()
    if not isinstance(logit_bias, Mapping):
        raise SamplingError("logit_bias must map token ids to biases", "logit_bias")
    if len(logit_bias) > MAX_BIASED_TOKENS:
        raise SamplingError(f"logit_bias may hold at most {MAX_BIASED_TOKENS} tokens", "logit_bias")
    pairs = {}
    for key, value in logit_bias.items():
        text = str(key)
        if isinstance(key, bool) or not text.isdigit() or not 0 <= int(text) < vocab_size:
            raise SamplingError(
                f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", "logit_bias"
            )
        pairs[int(text)] = checked_number(value, "logit_bias", -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    return tuple(sorted(pairs.items()))


def bias_matrix(biases: Sequence[tuple], batch: int, vocab: int) -> np.ndarray | None:
    """`(batch, vocab)` float32 logit biases of rows' `check_logit_bias` pairs (rows past
    `len(biases)` unbiased), or None when no row has any."""
    if not any(biases):
        return None
    out = np.zeros((batch, vocab), np.float32)
    for row, pairs in enumerate(biases):
        for token, value in pairs:
            out[row, token] = value
    return out


def uniform_noise(seeds, position, vocab):
    """`(B, V)` uniform noise in (0, 1) from a counter hash of `(seed, position, token)`.

    Args:
        seeds: `(B,)` int32 per-row seeds.
        position: int32 scalar, the position of the token being sampled.
        vocab: the vocabulary size.
    """
    u32 = tf.uint32
    seeds = tf.bitcast(tf.cast(seeds, tf.int32), u32)[:, None]  # (B, 1)
    tokens = tf.cast(tf.range(vocab), u32)[None, :]  # (1, V)
    position = tf.bitcast(tf.cast(position, tf.int32), u32)
    if position.shape.rank == 1:
        position = position[:, None]  # (B, 1)
    x = seeds * tf.constant(0x9E3779B1, u32) + tokens * tf.constant(0xC2B2AE3D, u32)
    x = x ^ (position * tf.constant(0x85EBCA77, u32) + tf.constant(0x27D4EB2F, u32))
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's finaliser
        x = (x ^ tf.bitwise.right_shift(x, tf.constant(shift, u32))) * tf.constant(mult, u32)
    x = x ^ tf.bitwise.right_shift(x, tf.constant(16, u32))
    # 23 bits: `m + 0.5` is exact in float32 and the largest value is 1 - 2^-24 (with 24
    # bits it rounded to 1.0, whose Gumbel noise is +inf: that token won whatever its
    # logit, an id past the tokenizer's included)
    mantissa = tf.cast(tf.bitwise.right_shift(x, tf.constant(9, u32)), tf.float32)
    return (mantissa + 0.5) / float(1 << 23)  # (B, V)


def limit_vocab(logits, vocab_limit: int | None):
    """`(B, V)` logits with ids `>= vocab_limit` made impossible (None: unchanged): an
    embedding padded past the tokenizer must never produce an id it cannot decode."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    valid = tf.range(tf.shape(logits)[-1]) < vocab_limit  # (V,)
    return tf.where(valid[None, :], logits, tf.cast(-1e9, logits.dtype))


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature-scaled logits `(B, V)` with the tokens top-k and top-p drop set to
    `NEG_INF`: the distribution `softmax(filter_logits(...))` is what `sample_tokens`
    samples from (and what speculative decoding verifies against).

    Args:
        logits: `(B, V)`.
        temperature: `(B,)` float32 (`<= 0` is treated as a tiny positive value).
        top_k: `(B,)` int32; keep the `k` most likely tokens (`<= 0`: all).
        top_p: `(B,)` float32; keep the smallest set whose probability reaches `p`
            (`>= 1`: all; the most likely token is always kept).

    Examples:
    >>> filter_logits(tf.constant([[2.0, 1.0, 0.0]]), tf.constant([1.0]),
    ...     tf.constant([2]), tf.constant([1.0])).numpy().tolist()
    [[2.0, 1.0, -1000000000.0]]
    """
    logits = tf.cast(logits, tf.float32)
    temperature = tf.cast(temperature, tf.float32)
    vocab = tf.shape(logits)[-1]
    scaled = logits / tf.maximum(temperature, 1e-6)[:, None]  # (B, V)
    ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")  # (B, V)
    k = tf.cast(top_k, tf.int32)
    k = tf.where(k > 0, tf.minimum(k, vocab), vocab)  # (B,)
    kth = tf.gather(ordered, k - 1, axis=1, batch_dims=1)[:, None]  # (B, 1)
    ordered = tf.where(ordered < kth, NEG_INF, ordered)
    probs = tf.nn.softmax(ordered, axis=-1)
    before = tf.cumsum(probs, axis=-1, exclusive=True)  # probability of better tokens
    kept = before < tf.cast(top_p, tf.float32)[:, None]  # the best token is always kept
    threshold = tf.reduce_min(tf.where(kept, ordered, -NEG_INF), axis=-1, keepdims=True)
    threshold = tf.maximum(threshold, kth)  # (B, 1)
    return tf.where(scaled < threshold, NEG_INF, scaled)


def sample_tokens(logits, temperature, top_k, top_p, seeds, position):
    """One token per row of `logits` `(B, V)`, with per-row settings.

    Args:
        logits: `(B, V)`.
        temperature: `(B,)` float32; `<= 0` is greedy (argmax).
        top_k: `(B,)` int32; keep the `k` most likely tokens (`<= 0`: all).
        top_p: `(B,)` float32; keep the smallest set whose probability reaches `p`
            (`>= 1`: all; the most likely token is always kept).
        seeds: `(B,)` int32 per-row seeds.
        position: int32 scalar, the position of the token being sampled, or `(B,)`.

    Returns:
        `(B,)` int32: Gumbel-max over the filtered, temperature-scaled logits
        (`filter_logits`), so the choice depends only on the row, its seed and the
        position. A batch of greedy rows skips the sampling work.
    """
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    temperature = tf.cast(temperature, tf.float32)

    def sample():
        filtered = filter_logits(logits, temperature, top_k, top_p)  # (B, V)
        noise = uniform_noise(seeds, position, tf.shape(logits)[-1])
        gumbel = -tf.math.log(-tf.math.log(noise))
        sampled = tf.argmax(filtered + gumbel, axis=-1, output_type=tf.int32)
        return tf.where(temperature > 0, sampled, greedy)

    return tf.cond(tf.reduce_any(temperature > 0), sample, lambda: greedy)


def constrain(logits, grammar):
    """`(B, V)` logits with what each row's automaton state forbids at -1e9 (as a
    grammar's mask given as `bias` would be: allowed logits are untouched).

    Args:
        logits: `(B, V)`.
        grammar: `(table (S, C), classes (A, V), dead (S,), which (B,), states (B,))`:
            the state after a token of each class (-1: not allowed), each automaton's
            token classes, the states nothing may leave, each row's automaton and state
            (`serving.automaton_batch.AutomatonBatch`).
    """
    table, classes, _, which, states = grammar
    columns = tf.gather(classes, which)  # (B, V)
    allowed = tf.gather(tf.gather(table, states), columns, batch_dims=1) >= 0  # (B, V)
    return logits + tf.cast(tf.where(allowed, 0.0, -1e9), logits.dtype)


def follow_grammar(grammar, token, moving):
    """`(grammar, ended)`: each `moving` row's state advanced past its `token` `(B,)`,
    and `(B,)` whether that row's new state lets no token follow (the document is
    complete)."""
    table, classes, dead, which, states = grammar
    column = tf.gather_nd(classes, tf.stack([which, token], axis=1))  # (B,)
    after = tf.gather_nd(table, tf.stack([states, column], axis=1))  # (B,)
    states = tf.where(tf.logical_and(moving, after >= 0), after, states)
    ended = tf.logical_and(moving, tf.gather(dead, states))
    return (table, classes, dead, which, states), ended
