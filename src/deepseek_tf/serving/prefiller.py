"""Prompts into the continuous scheduler's rows: alone after a cached prefix, or several
together in one padded call.

A prompt alone is a small product that uses a CPU poorly: for the `shakespeare-char`
shape on 2 cores, one 32-token prompt takes 3.3 ms, four together 7.3 ms and eight
10.4 ms (1.3 ms each). So prompts admitted at the same time with nothing useful in the
prefix cache are prefilled as one batch: each right-padded to the longest one's
power-of-two bucket (the padded positions of a positional cache are overwritten, in
order, by the tokens decoded there before any query reads them), the logits taken at
each row's own last position, and the group padded up to one of `GROUPS` (a few
compiled batch sizes) with copies of its first prompt.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from deepseek_tf.generation.decoding import positional_cache, prefill_bucket, prefill_chunks

GROUPS = (1, 4, 8)  # batch sizes of a prefill call (a group is padded up to one)
# a group's prompts are padded to at least this many tokens: a few idle positions, and
# the warm-up compiles no group programs for the shortest lengths (serving tests' time)
GROUP_MIN_TOKENS = 8


class Prefiller:
    """Prefills prompts into rows of a `serving.slot_cache.SlotCache`.

    Args:
        model: a `CausalLM`.
        loop: its `generation.decoding.DecodeLoop`.
        rows_cache: the `SlotCache` the rows are written into.
        prefix: the scheduler's `PrefixCache` (each prefilled prompt is stored in it).
        lora: the served adapters (`models.multi_lora.MultiLora`) or None.
    """

    def __init__(self, model, loop, rows_cache, prefix, lora=None):
        self.model, self.loop, self.rows_cache, self.prefix, self.lora = (
            model, loop, rows_cache, prefix, lora)  # fmt: skip
        slots = rows_cache.slots
        # a cache with a running state (a hybrid block's convolution) is prefilled row by row
        self.groups = tuple(g for g in GROUPS if g <= slots) if positional_cache(model) else (1,)
        self.grouped = 0  # statistics: prompts prefilled in groups

    def groupable(self, n: int, shared: int) -> bool:
        """A prompt of `n` tokens, `shared` of them cached, goes into a group: groups are
        on, its padded bucket fits its row, and skipping the cached tokens would not
        shorten its own call."""
        return (len(self.groups) > 1 and _bucket(n) <= self.rows_cache.span_for(n - 1)
                and prefill_bucket(n - shared) == prefill_bucket(n))  # fmt: skip

    def one(self, slot: int, prompt: list[int], adapter: int, shared: int = 0, row=None):
        """Prefills `prompt` after its `shared` cached tokens (`row`: their batch-1 cache,
        or None) into row `slot`."""
        span = self.rows_cache.span_for(len(prompt) - 1)  # a row just long enough
        row = self.model.init_cache(1, span) if row is None else self.rows_cache.fit(row, span)
        rest = tf.constant([prompt[shared:]], tf.int32)  # (1, P - shared)
        with adapter_rows(self.lora, [adapter]):
            logits, row = self.loop.prefill(rest, row, start=shared, room=span)
        self.prefix.store(prompt, row, namespace=adapter)
        self.rows_cache.insert(tf.constant(slot), row, logits)

    def group(self, slots: list[int], prompts: list[list[int]], adapters: list[int]):
        """Prefills several prompts (each `groupable`) in one call into rows `slots`."""
        n, k = len(prompts), next(g for g in self.groups if g >= len(prompts))
        slots, prompts, adapters = ([*x, *x[:1] * (k - n)] for x in (slots, prompts, adapters))
        longest = max(map(len, prompts))
        span = self.rows_cache.span_for(longest - 1)
        ids = np.zeros((k, _bucket(longest)), np.int32)  # (K, P)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = prompt
        last = tf.constant([len(p) - 1 for p in prompts], tf.int32)  # (K,) each one's end
        with adapter_rows(self.lora, adapters):
            logits, rows = self.loop.prefill_chunk(
                tf.constant(ids), self.model.init_cache(k, span), tf.constant(0), last
            )  # (K, V)
        # a slot named twice takes its first row: the copies write the same bits
        self.rows_cache.insert(tf.constant(slots, tf.int32), rows, logits)
        for prompt, adapter, row in zip(prompts[:n], adapters, self.rows_cache.rows_of(rows)):
            self.prefix.store(prompt, row, namespace=adapter)
        self.grouped += n

    def warm_up(self, span: int, longest: int | None, groups: bool) -> None:
        """Compiles the prefill calls of prompts up to `longest` tokens (None: `span`) in
        rows of `span` positions: alone, and with `groups`, in each group size."""
        longest = min(span, longest or span)
        sizes = [n for n in prefill_chunks((1 << span.bit_length()) - 1) if n <= longest]
        row, logits = self.model.init_cache(1, span), None
        for n in sizes:
            logits, row = self.loop.prefill(tf.zeros((1, n), tf.int32), row, room=span)
        self.rows_cache.insert(tf.constant(0), row, logits)
        grouped = [n for n in sizes if n >= GROUP_MIN_TOKENS]
        for k in self.groups[1:] if groups and grouped else ():
            rows = self.model.init_cache(k, span)
            for n in grouped:
                ids, last = tf.zeros((k, n), tf.int32), tf.fill((k,), n - 1)
                logits, rows = self.loop.prefill_chunk(ids, rows, tf.constant(0), last)
            self.rows_cache.insert(tf.zeros((k,), tf.int32), rows, logits)
            self.rows_cache.rows_of(rows)


def adapter_rows(lora, ids):
    """Within the block, row `i` of the model's calls uses served adapter `ids[i]`
    (`models.multi_lora.MultiLora.rows`); nothing to set without adapters (`lora` None)."""
    return contextlib.nullcontext() if lora is None else lora.rows(ids)


def _bucket(n: int) -> int:
    """The padded length of a group whose longest prompt has `n` tokens."""
    return max(prefill_bucket(n), GROUP_MIN_TOKENS)
