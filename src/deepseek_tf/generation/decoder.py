"""A batch of rows decoded together: `generate`'s and the dynamic batcher's driver of the
one decode loop (`generation.decoding.DecodeLoop`). `Decoder.start` prefills the rows and
returns a `DecodeState` whose `step` decodes a chunk of positions at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from deepseek_tf.generation import penalties as pen
from deepseek_tf.generation.decoding import DecodeLoop, cache_length, pad_batch
from deepseek_tf.generation.sampler import bias_matrix


@dataclass
class Row:
    """One sequence of a batch: its prompt and sampling settings (checked by the caller,
    see `sampler.check_sampling`)."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logit_bias: tuple = ()  # `(token, bias)` pairs (`sampler.check_logit_bias`)
    penalties: pen.Penalties = pen.Penalties()  # presence, frequency, repetition


class Decoder:
    """Host side of the decode loop: lays out a batch of `Row`s, prefills, decodes in
    steps of up to `chunk` positions (streaming, cancelling rows between steps).

    Args:
        model: a `CausalLM`.
        jit_compile: compile the loop with XLA.
        logprobs: report log-probabilities (see `DecodeLoop`).
        vocab_limit: ids the tokenizer can decode (see `DecodeLoop`).
        cache_bytes: the CPU's last-level cache (see `DecodeLoop`); None: the system's.
    """

    def __init__(self, model, jit_compile: bool = True, logprobs: bool = False, vocab_limit=None,
                 cache_bytes: int | None = None):  # fmt: skip
        self.model = model
        self.loop = DecodeLoop(model, jit_compile, logprobs, vocab_limit, cache_bytes)

    def start(self, rows: Sequence[Row], stop_ids: Sequence[int] = ()) -> DecodeState:
        """Prefills `rows` (each `len(prompt) + max_new_tokens <= model.max_seq_len`)."""
        n = len(rows)
        batch = pad_batch(n)
        ends = [len(r.prompt) + r.max_new_tokens for r in rows]
        cache_len = cache_length(max(ends), self.model.max_seq_len, self.loop.xla_step)
        ids = np.zeros((batch, cache_len), np.int32)
        is_prompt = np.zeros((batch, cache_len), bool)
        for i, r in enumerate(rows):
            ids[i, : len(r.prompt)] = r.prompt
            is_prompt[i, : len(r.prompt)] = True
        start = min(len(r.prompt) for r in rows)  # prefilled; the rest forced in the loop
        cache = self.model.init_cache(batch, cache_len)
        logits, cache = self.loop.prefill(tf.constant(ids[:, :start]), cache, room=cache_len)
        pad = batch - n
        state = DecodeState(self, rows, stop_ids)
        state.ids, state.is_prompt = tf.constant(ids), tf.constant(is_prompt)
        state.cache, state.logits, state.position = cache, logits, start
        vocab = self.model.vocab_size
        biases = bias_matrix([r.logit_bias for r in rows], batch, vocab)
        state.bias = None if biases is None else tf.constant(biases)
        state.penalties = None
        if any(r.penalties.active for r in rows):
            settings = pen.settings_arrays([r.penalties for r in rows], batch)
            counts, seen = pen.initial_state([r.prompt for r in rows], batch, vocab)
            state.penalties = tuple(map(tf.constant, (*settings, counts, seen)))
        state.ends = np.asarray(ends + [1] * pad, np.int32)
        state.done = np.asarray([False] * n + [True] * pad)
        state.sampling = (
            tf.constant([r.temperature for r in rows] + [0.0] * pad, tf.float32),
            tf.constant([r.top_k for r in rows] + [0] * pad, tf.int32),
            tf.constant([r.top_p for r in rows] + [1.0] * pad, tf.float32),
            tf.constant([r.seed for r in rows] + [0] * pad, tf.int32),
        )
        return state


class DecodeState:
    """The running decode of one batch (made by `Decoder.start`)."""

    def __init__(self, decoder: Decoder, rows: Sequence[Row], stop_ids: Sequence[int]):
        self.decoder = decoder
        self.rows = list(rows)
        self.stop_set = {int(t) for t in stop_ids}
        self.stop_ids = tf.constant(sorted(self.stop_set) or [-1], tf.int32)

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def cancel(self, row: int) -> None:
        """Stops decoding `row` (its client left, or it reached a stop string)."""
        self.done[row] = True

    def step(self, chunk: int | None = None) -> list[list[tuple[int, float, list, float]]]:
        """Decodes up to `chunk` positions (None: to the end); returns each row's new
        `(token, logprob, [(alt_token, alt_logprob), ...], entropy)` (a stop token is
        included; logprob, alternatives and entropy only with `logprobs`)."""
        before = self.position
        was_done = self.done.copy()
        last = int(self.ends.max())
        stop = last if chunk is None else min(before + chunk, last)
        out = self.decoder.loop.decode(
            self.ids,
            self.is_prompt,
            self.cache,
            self.logits,
            tf.fill((len(self.done),), tf.constant(before, tf.int32)),  # rows share positions
            tf.constant(stop - before, tf.int32),
            tf.constant(self.ends),
            tf.constant(self.done),
            self.sampling,
            self.stop_ids,
            self.bias,
            self.penalties,
        )
        steps, _, self.ids, self.cache, self.logits, done, logprobs, top_ids, top_lps = out[:9]
        ent, self.penalties = out[9], out[10] or None
        self.position = before + int(steps)
        self.done = done.numpy().copy()
        ids = self.ids.numpy()
        logprobs, top_ids, top_lps = logprobs.numpy(), top_ids.numpy(), top_lps.numpy()
        ent = ent.numpy()
        new = []
        for row, r in enumerate(self.rows):
            tokens = []
            if not was_done[row]:
                first = max(before, len(r.prompt))
                last_new = min(self.position, len(r.prompt) + r.max_new_tokens)
                for i in range(first, last_new):
                    alts = list(zip(top_ids[row, i].tolist(), top_lps[row, i].tolist()))
                    token = int(ids[row, i])
                    tokens.append((token, float(logprobs[row, i]), alts, float(ent[row, i])))
                    if tokens[-1][0] in self.stop_set:
                        break
            new.append(tokens)
        return new
