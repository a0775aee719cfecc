"""KV-cached generation compiled with `tf.function`, and its uncached reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import InputError
from deepseek_tf.generation.sampler import sample_next

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this (fewer retraces)


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_seq_len: int):
    if not prompts:
        raise InputError("no prompt given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty")
        if len(p) > max_seq_len:
            raise InputError(
                f"prompt {i} has {len(p)} tokens, more than the model's context of {max_seq_len}"
            )
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise InputError(f"prompt {i}: token id {bad[0]} is out of range [0, {vocab_size})")


class Generator:
    """Batched autoregressive decoding with a KV cache, one XLA loop per call.

    The prompt's shortest common prefix is processed in one pass (prefill);
    then a `tf.while_loop` decodes one token per step against the cache. Rows
    whose prompt is longer keep their prompt tokens until it ends, so every row
    shares one position counter. Sequences longer than the model's context
    continue in a sliding window: the last half-context is re-encoded.

    Args:
        model: a `CausalLM`.
        jit_compile: compile prefill and the decoding loop with XLA.
    """

    def __init__(self, model, jit_compile: bool = True):
        self.model = model
        self._prefill = tf.function(
            self._prefill_fn, jit_compile=jit_compile, reduce_retracing=True
        )
        self._decode = tf.function(self._decode_fn, jit_compile=jit_compile, reduce_retracing=True)

    def _prefill_fn(self, ids, cache):
        logits, cache = self.model.call_with_cache(ids, cache, tf.constant(0, tf.int32))
        return logits[:, -1, :], cache  # (B, V)

    def _decode_fn(
        self, ids, is_prompt, cache, logits, start, end, temperature, top_k, top_p, seed, stop_ids
    ):
        batch = tf.shape(ids)[0]
        done = tf.zeros((batch,), tf.bool)
        length = tf.fill((batch,), end)

        def cond(i, ids, cache, logits, done, length):
            return tf.logical_and(i < end, tf.logical_not(tf.reduce_all(done)))

        def body(i, ids, cache, logits, done, length):
            step_seed = tf.stack([seed, i])
            sampled = sample_next(logits, temperature, top_k, top_p, step_seed)  # (B,)
            forced = is_prompt[:, i]
            token = tf.where(forced, ids[:, i], sampled)
            token = tf.where(done, tf.zeros_like(token), token)
            stopped = tf.logical_and(
                tf.logical_not(forced), tf.reduce_any(token[:, None] == stop_ids[None, :], -1)
            )
            newly = tf.logical_and(stopped, tf.logical_not(done))
            length = tf.where(newly, i + 1, length)
            done = tf.logical_or(done, stopped)
            ids = tf.tensor_scatter_nd_update(
                ids, tf.stack([tf.range(batch), tf.fill((batch,), i)], axis=1), token
            )
            step_logits, cache = self.model.call_with_cache(token[:, None], cache, i)
            return i + 1, ids, cache, step_logits[:, -1, :], done, length

        _, ids, _, _, _, length = tf.while_loop(
            cond, body, (start, ids, cache, logits, done, length)
        )
        return ids, length

    def _run_window(self, prompts, max_new, temperature, top_k, top_p, seed, stop_ids):
        """Decodes `max_new` tokens after each prompt, all within the context."""
        batch = len(prompts)
        total = max(len(p) for p in prompts) + max_new
        cache_len = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, self.model.max_seq_len)
        ids = np.zeros((batch, cache_len), np.int32)
        is_prompt = np.zeros((batch, cache_len), bool)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = p
            is_prompt[row, : len(p)] = True
        start = min(len(p) for p in prompts)
        cache = self.model.init_cache(batch, cache_len)
        logits, cache = self._prefill(tf.constant(ids[:, :start]), cache)
        ends = [len(p) + max_new for p in prompts]
        out, length = self._decode(
            tf.constant(ids),
            tf.constant(is_prompt),
            cache,
            logits,
            tf.constant(start, tf.int32),
            tf.constant(max(ends), tf.int32),
            tf.constant(temperature, tf.float32),
            tf.constant(top_k, tf.int32),
            tf.constant(top_p, tf.float32),
            tf.constant(seed, tf.int32),
            tf.constant(list(stop_ids) or [-1], tf.int32),
        )
        out, length = out.numpy(), length.numpy()
        results = []
        for row, p in enumerate(prompts):
            stop = min(int(length[row]), ends[row])
            results.append((out[row, len(p) : stop].tolist(), stop < ends[row]))
        return results

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 100,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """Returns the new tokens of each prompt (a stop token ends a row, and is kept)."""
        model = self.model
        _check_prompts(prompts, model.vocab_size, model.max_seq_len)
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        context = model.max_seq_len
        sequences = [list(map(int, p)) for p in prompts]
        new = [[] for _ in prompts]
        finished = [False] * len(prompts)
        remaining, round_index = max_new_tokens, 0
        while remaining > 0 and not all(finished):
            if max(len(s) for s in sequences) + remaining > context:
                sequences = [s[-max(context // 2, 1) :] for s in sequences]  # sliding window
            n = min(remaining, context - max(len(s) for s in sequences))
            window = self._run_window(
                sequences, n, temperature, top_k, top_p, seed + 7919 * round_index, stop_ids
            )
            for row, (tokens, stopped) in enumerate(window):
                if finished[row]:
                    continue
                new[row].extend(tokens)
                sequences[row] = sequences[row] + tokens
                finished[row] = stopped
            remaining -= n
            round_index += 1
        return new


def generate_uncached(
    model, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy reference: recomputes the full sequence for every new token (slow)."""
    _check_prompts([prompt], model.vocab_size, model.max_seq_len)
    ids = list(map(int, prompt))
    new = []
    for _ in range(max_new_tokens):
        logits = model(np.asarray([ids[-model.max_seq_len :]], np.int32))  # (1, T, V)
        token = int(np.argmax(logits[0, -1]))
        new.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return new
