"""Step-wise batched decoding for the server: prefill once, then decode in chunks.

Unlike `generation.Generator` (one XLA loop per call, all tokens at once), a
`ChunkedDecoder` keeps the KV cache between calls, so the server can hand out
tokens every `chunk` steps (streaming), drop rows whose client went away or hit
a stop string, and still decode the whole batch in one compiled loop per chunk.

Every row has its own temperature, top-p and seed; sampling a row depends only
on its own seed and position, so a seeded request gives the same tokens whether
it is batched with others or not. Rows share one position counter (as in
`Generator`): a row whose prompt is longer keeps its prompt tokens until it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from deepseek_tf.generation.generate import CACHE_BUCKET

NEG_INF = -1e9
TOP_LOGPROBS = 5  # alternatives reported per generated token


def _uniform_noise(seeds, step, vocab):
    """`(B, V)` uniform noise in (0, 1) from a counter hash of `(seed, step, token)`.

    Vectorised over rows (unlike per-row `stateless_uniform` calls), so one row's
    draws depend only on its own seed and position, never on its batch.
    """
    u32 = tf.uint32
    seeds = tf.bitcast(tf.cast(seeds, tf.int32), u32)[:, None]
    tokens = tf.cast(tf.range(vocab), u32)[None, :]
    step = tf.bitcast(tf.cast(step, tf.int32), u32)
    x = seeds * tf.constant(0x9E3779B1, u32) + tokens * tf.constant(0xC2B2AE3D, u32)
    x = x ^ (step * tf.constant(0x85EBCA77, u32) + tf.constant(0x27D4EB2F, u32))
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's finaliser
        x = (x ^ tf.bitwise.right_shift(x, tf.constant(shift, u32))) * tf.constant(mult, u32)
    x = x ^ tf.bitwise.right_shift(x, tf.constant(16, u32))
    mantissa = tf.cast(tf.bitwise.right_shift(x, tf.constant(8, u32)), tf.float32)
    return (mantissa + 0.5) / float(1 << 24)


def sample_rows(logits, temperature, top_p, seeds, step):
    """One token per row with per-row `temperature` `(B,)`, `top_p` `(B,)`, `seeds` `(B,)`.

    Greedy where the temperature is `<= 0`; otherwise Gumbel-max sampling over
    the nucleus, with noise drawn from `(seed, step)` of each row. A batch of
    greedy rows skips the sampling work.
    """
    logits = tf.cast(logits, tf.float32)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

    def sample():
        scaled = logits / tf.maximum(temperature, 1e-6)[:, None]
        ordered = tf.sort(scaled, axis=-1, direction="DESCENDING")
        probs = tf.nn.softmax(ordered, axis=-1)
        before = tf.cumsum(probs, axis=-1, exclusive=True)
        kept = before < top_p[:, None]  # the best token is always kept
        threshold = tf.reduce_min(tf.where(kept, ordered, -NEG_INF), axis=-1, keepdims=True)
        filtered = tf.where(scaled < threshold, NEG_INF, scaled)
        gumbel = -tf.math.log(-tf.math.log(_uniform_noise(seeds, step, tf.shape(logits)[-1])))
        sampled = tf.argmax(filtered + gumbel, axis=-1, output_type=tf.int32)
        return tf.where(temperature > 0, sampled, greedy)

    return tf.cond(tf.reduce_any(temperature > 0), sample, lambda: greedy)


@dataclass
class Row:
    """One sequence of a batch: its prompt and sampling settings."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def _bucket_batch(n: int) -> int:
    """Batch sizes are padded to a power of two (fewer compiled shapes)."""
    size = 1
    while size < n:
        size *= 2
    return size


class ChunkedDecoder:
    """Compiled prefill + chunked decode loop over a `CausalLM` and its KV cache.

    Args:
        model: a `CausalLM`.
        chunk: tokens decoded per call of `DecodeState.step`.
        jit_compile: compile the decode loop with XLA.
    """

    def __init__(self, model, chunk: int = 8, jit_compile: bool = True):
        self.model = model
        self.chunk = chunk
        self._prefill = tf.function(
            self._prefill_fn, jit_compile=jit_compile, reduce_retracing=True
        )
        self._decode = tf.function(self._decode_fn, jit_compile=jit_compile, reduce_retracing=True)

    def _prefill_fn(self, ids, cache):
        logits, cache = self.model.call_with_cache(ids, cache, tf.constant(0, tf.int32))
        return logits[:, -1, :], cache

    def _decode_fn(
        self,
        ids,
        is_prompt,
        cache,
        logits,
        start,
        stop,
        ends,
        done,
        temperature,
        top_p,
        seeds,
        stop_ids,
    ):
        batch = tf.shape(ids)[0]
        logprobs = tf.zeros(tf.shape(ids), tf.float32)
        top_ids = tf.zeros((batch, tf.shape(ids)[1], TOP_LOGPROBS), tf.int32)
        top_lps = tf.zeros((batch, tf.shape(ids)[1], TOP_LOGPROBS), tf.float32)

        def cond(i, ids, cache, logits, done, logprobs, top_ids, top_lps):
            return tf.logical_and(i < stop, tf.logical_not(tf.reduce_all(done)))

        def body(i, ids, cache, logits, done, logprobs, top_ids, top_lps):
            sampled = sample_rows(logits, temperature, top_p, seeds, i)
            forced = is_prompt[:, i]
            token = tf.where(forced, ids[:, i], sampled)
            token = tf.where(done, tf.zeros_like(token), token)
            log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
            chosen = tf.gather(log_probs, token, axis=1, batch_dims=1)
            best_lps, best_ids = tf.math.top_k(log_probs, TOP_LOGPROBS)
            index = tf.stack([tf.range(batch), tf.fill((batch,), i)], axis=1)
            ids = tf.tensor_scatter_nd_update(ids, index, token)
            logprobs = tf.tensor_scatter_nd_update(logprobs, index, chosen)
            top_ids = tf.tensor_scatter_nd_update(top_ids, index, best_ids)
            top_lps = tf.tensor_scatter_nd_update(top_lps, index, best_lps)
            stopped = tf.logical_and(
                tf.logical_not(forced), tf.reduce_any(token[:, None] == stop_ids[None, :], -1)
            )
            done = tf.logical_or(done, tf.logical_or(stopped, i + 1 >= ends))
            step_logits, cache = self.model.call_with_cache(token[:, None], cache, i)
            return i + 1, ids, cache, step_logits[:, -1, :], done, logprobs, top_ids, top_lps

        i, ids, cache, logits, done, logprobs, top_ids, top_lps = tf.while_loop(
            cond, body, (start, ids, cache, logits, done, logprobs, top_ids, top_lps)
        )
        return i, ids, cache, logits, done, logprobs, top_ids, top_lps

    def start(self, rows: Sequence[Row], stop_ids: Sequence[int] = ()) -> DecodeState:
        """Prefills `rows` (each `len(prompt) + max_new_tokens <= model.max_seq_len`)."""
        n = len(rows)
        batch = _bucket_batch(n)
        ends = [len(r.prompt) + r.max_new_tokens for r in rows]
        total = max(ends)
        cache_len = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, self.model.max_seq_len)
        ids = np.zeros((batch, cache_len), np.int32)
        is_prompt = np.zeros((batch, cache_len), bool)
        for i, r in enumerate(rows):
            ids[i, : len(r.prompt)] = r.prompt
            is_prompt[i, : len(r.prompt)] = True
        shortest = min(len(r.prompt) for r in rows)
        start = 1 << (shortest.bit_length() - 1)  # a power of two: few prefill shapes
        cache = self.model.init_cache(batch, cache_len)
        logits, cache = self._prefill(tf.constant(ids[:, :start]), cache)
        pad = batch - n
        state = DecodeState(self, rows, stop_ids)
        state.ids = tf.constant(ids)
        state.is_prompt = tf.constant(is_prompt)
        state.cache, state.logits = cache, logits
        state.position = start
        state.ends = np.asarray(ends + [1] * pad, np.int32)
        state.done = np.asarray([False] * n + [True] * pad)
        pad_f = [0.0] * pad
        state.temperature = tf.constant([r.temperature for r in rows] + pad_f, tf.float32)
        state.top_p = tf.constant([r.top_p for r in rows] + [1.0] * pad, tf.float32)
        state.seeds = tf.constant([r.seed % (2**31) for r in rows] + [0] * pad, tf.int32)
        return state


class DecodeState:
    """The running decode of one batch (made by `ChunkedDecoder.start`)."""

    def __init__(self, decoder: ChunkedDecoder, rows: Sequence[Row], stop_ids: Sequence[int]):
        self.decoder = decoder
        self.rows = list(rows)
        self.stop_set = {int(t) for t in stop_ids}
        self.stop_ids = tf.constant(list(self.stop_set) or [-1], tf.int32)

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def cancel(self, row: int) -> None:
        """Stops decoding `row` (its client left, or it reached a stop string)."""
        self.done[row] = True

    def step(self) -> list[list[tuple[int, float, list[tuple[int, float]]]]]:
        """Decodes up to `chunk` positions; returns each row's new `(token, logprob, top)`."""
        before = self.position
        was_done = self.done.copy()
        stop = min(before + self.decoder.chunk, int(self.ends.max()))
        out = self.decoder._decode(
            self.ids,
            self.is_prompt,
            self.cache,
            self.logits,
            tf.constant(before, tf.int32),
            tf.constant(stop, tf.int32),
            tf.constant(self.ends),
            tf.constant(self.done),
            self.temperature,
            self.top_p,
            self.seeds,
            self.stop_ids,
        )
        position, self.ids, self.cache, self.logits, done, logprobs, top_ids, top_lps = out
        self.position = int(position)
        self.done = done.numpy().copy()
        ids = self.ids.numpy()
        logprobs, top_ids, top_lps = logprobs.numpy(), top_ids.numpy(), top_lps.numpy()
        new = []
        for row, r in enumerate(self.rows):
            tokens = []
            if not was_done[row]:
                first = max(before, len(r.prompt))
                last = min(self.position, len(r.prompt) + r.max_new_tokens)
                for i in range(first, last):
                    top = list(zip(top_ids[row, i].tolist(), top_lps[row, i].tolist()))
                    tokens.append((int(ids[row, i]), float(logprobs[row, i]), top))
                    if tokens[-1][0] in self.stop_set:
                        break
            new.append(tokens)
        return new
