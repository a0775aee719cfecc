"""The decode loop: prefill, then one KV-cached step per token -- the one loop of every
decoding path (`Generator`, the server, the SavedModel `generate` signature).

The model supplies the cached step (`CausalLM.call_with_cache`). Every row has its own
position (a `(B,)` vector): `generate` starts its rows together, the server's continuous
batch holds rows that joined at different times. A row whose prompt is longer than the
shortest keeps its prompt tokens (forced) until it ends, so one compiled loop decodes a
batch of prompts of any lengths. The shortest prompt is prefilled in chunks of powers of
two (`prefill_chunks`: few compiled shapes); the rest of each prompt is fed through the
loop. Cache lengths are rounded up to `CACHE_BUCKET`. `DecodeLoop.token_step` is the one
step both the compiled loop and the server's scheduler run, so the same prompt and
sampling settings give the same tokens whichever path decodes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from deepseek_tf.generation import penalties as pen
from deepseek_tf.generation.memory_bound import accelerated, fits_in_cache
from deepseek_tf.generation.sampler import bias_matrix, limit_vocab, sample_tokens
from deepseek_tf.layers.mla import MultiHeadLatentAttention

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this (fewer shapes)
TOP_LOGPROBS = 5  # alternatives reported per generated token (with `logprobs`)


def prefill_chunks(n: int) -> list[int]:
    """Lengths of the prefill calls that cover `n` prompt tokens: the powers of two of
    `n`'s binary form, largest first (at most `log2(context)` compiled shapes).

    >>> prefill_chunks(13)
    [8, 4, 1]
    """
    n = max(int(n), 1)
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


def prefill_bucket(n: int) -> int:
    """The one padded prefill call's length for `n` prompt tokens: the power of two at or
    above `n` (`DecodeLoop.prefill` with `room`).

    >>> prefill_bucket(13)
    16
    """
    return 1 << (max(int(n), 1) - 1).bit_length()


def cache_length(total: int, max_seq_len: int) -> int:
    """Cache positions for sequences of up to `total` tokens."""
    return min(-(-int(total) // CACHE_BUCKET) * CACHE_BUCKET, max_seq_len)


def prepare_decoding(model) -> None:
    """Brings the weights that layers derive for decoding up to date (MLA's absorbed
    kernels, `MultiHeadLatentAttention.prepare_decoding`); every decode loop calls it
    when it is made."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, MultiHeadLatentAttention):
            layer.prepare_decoding()


def positional_cache(model) -> bool:
    """True when every layer's cache is indexed by position (attention keys and values,
    MLA latents), with no running state (a hybrid block's convolution keeps its last
    inputs): then a call may write past the positions it needs, for later tokens to
    overwrite."""
    return all(getattr(block, "conv", None) is None for block in model.blocks)


def _memory_bound_on_cpu(model, cache_bytes: int | None) -> bool:
    """A CPU-only machine, and `model`'s weights exceed its cache (`fits_in_cache`)."""
    return not accelerated() and fits_in_cache(model, cache_bytes) is False


def xla_prefill(model, jit_compile: bool, cache_bytes: int | None = None) -> bool:
    """Whether `model`'s prefill programs are compiled with XLA: as `jit_compile`, except
    on a CPU-only machine for a model whose weights do not fit in the CPU's cache
    (`memory_bound.fits_in_cache`; `cache_bytes` as there). There TensorFlow's own kernels
    prefilled 512 tokens of the 1.46B demonstration 1.3-2.1x faster than XLA's CPU backend
    (its gathers of expert weights and small batched matmuls are slow) and the first token
    came sooner, while a model held in cache prefills faster with XLA (the shakespeare-char
    server: `benchmarks/README.md`, decode_real and serve_load).
    """
    return jit_compile and not _memory_bound_on_cpu(model, cache_bytes)


def xla_decode(model, jit_compile: bool, cache_bytes: int | None = None) -> bool:
    """Whether `model`'s token step and decode loop are compiled with XLA: as
    `jit_compile`, except on a CPU-only machine for a model whose weights are held in a
    16-bit float and do not fit in the CPU's cache. XLA's CPU backend computes bfloat16
    and float16 dots in float32 from converted copies of the weights, and hoists those
    copies out of the decode loop: every weight is held twice more, per call (the 1.46B
    demonstration in bfloat16 peaked at 10.2 GB with XLA against 4.0 GB without, and
    stepped no faster). TensorFlow's own (oneDNN) kernels read the 16-bit weights as
    they are. Float32 weights keep XLA: it fuses the step's many small ops.
    """
    sixteen_bit = tf.as_dtype(model.variable_dtype) in (tf.bfloat16, tf.float16)
    return jit_compile and not (sixteen_bit and _memory_bound_on_cpu(model, cache_bytes))


def pad_batch(n: int) -> int:
    """Batch sizes are padded to a power of two (fewer compiled shapes)."""
    return 1 << max(int(n) - 1, 0).bit_length()


class DecodeLoop:
    """The compiled prefill, token step and decode loop of one model.

    Args:
        model: a `CausalLM`.
        jit_compile: compile them with XLA.
        logprobs: also return each chosen token's log-probability, the
            `TOP_LOGPROBS` best alternatives (the server's `logprobs`) and the
            entropy of the distribution it was drawn from (per-token uncertainty).
        vocab_limit: ids the tokenizer can decode (`tokenizer.vocab_size`); a
            checkpoint's embedding often has more rows than its tokenizer has
            tokens (DeepSeek-V3: 129,280 rows), and those ids are never produced.
            None: every id of the model.
        cache_bytes: the CPU's last-level cache, which the XLA choices compare the
            weights with (`xla_prefill`, `xla_decode`); None: read from the system.
    """

    def __init__(self, model, jit_compile: bool = True, logprobs: bool = False, vocab_limit=None,
                 cache_bytes: int | None = None):  # fmt: skip
        prepare_decoding(model)
        self.model = model
        self.logprobs = logprobs
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < model.vocab_size else None
        # autograph=False here and in every decoding/serving program: their loops are
        # explicit `tf.while_loop`s and no Python branch reads a tensor, while converting
        # each function the model calls cost ~8% of the tracing time of the decode tests
        self.jit_compile = xla_decode(model, jit_compile, cache_bytes)  # the step's, the loop's
        compiled = dict(jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
        self.prefill_jit_compile = xla_prefill(model, jit_compile, cache_bytes)
        prefill = {**compiled, "jit_compile": self.prefill_jit_compile}
        self.prefill_program = tf.function(self._prefill_chunk, **prefill)
        # a model read from memory on a CPU (so prefilled without XLA): its first prefill
        # runs eagerly (see prefill_chunk)
        self._eager_prefill = _memory_bound_on_cpu(model, cache_bytes)
        self.step = tf.function(self.token_step, **compiled)
        self.decode = tf.function(self._decode, **compiled)

    def prefill(self, ids, cache, start: int = 0, room: int | None = None):
        """`(B, P)` ids at positions `start..start+P-1` -> the last position's logits
        `(B, V)` and the cache.

        In `prefill_chunks(P)` calls; or, given `room` (the cache's positions) when the
        model's cache is positional (`positional_cache`) and
        `start + prefill_bucket(P) <= room`, in one call of `prefill_bucket(P)` ids, padded
        with id 0: one pass over the weights and one compiled program instead of up to
        `log2(P)`. The padded positions' keys are overwritten, in order, by the tokens
        decoded there before any query can see them (the attention masks by position).
        """
        p = ids.shape[1]
        bucket = prefill_bucket(p)
        if room is not None and positional_cache(self.model) and start + bucket <= room:
            padded = tf.pad(ids, [[0, 0], [0, bucket - p]])  # (B, bucket)
            at, last = tf.constant(start, tf.int32), tf.constant(p - 1, tf.int32)
            return self.prefill_chunk(padded, cache, at, last)
        logits, at = None, int(start)
        for n in prefill_chunks(p):
            chunk = ids[:, at - start : at - start + n]  # (B, n)
            # `last` given as the padded call gives it: one program per chunk length
            end = tf.constant(n - 1, tf.int32)
            logits, cache = self.prefill_chunk(chunk, cache, tf.constant(at, tf.int32), end)
            at += n
        return logits, cache

    def prefill_chunk(self, ids, cache, start, last=None):
        """The prefill program (`_prefill_chunk`). For a model whose weights exceed a
        CPU's cache (prefilled without XLA: `xla_prefill`) the first call runs eagerly:
        tracing the 1.46B demonstration's prefill took ~2 s, running it eagerly ~1 s and
        the traced program ~0.4 s, so a one-shot `generate` reaches its first token
        sooner and a server traces the program at its second prompt."""
        if self._eager_prefill and tf.executing_eagerly():
            self._eager_prefill = False
            return self._prefill_chunk(ids, cache, start, last)
        return self.prefill_program(ids, cache, start, last)

    def _prefill_chunk(self, ids, cache, start, last=None):
        """`(B, n)` ids at `start...` -> the logits `(B, V)` of chunk position `last`
        (None: the last) and the cache."""
        last = tf.shape(ids)[1] - 1 if last is None else last
        logits, cache = self.model.call_with_cache(ids, cache, start, logits_at=last)  # (B, 1, V)
        return self._limit(logits[:, 0]), cache

    def _limit(self, logits):
        return limit_vocab(logits, self.vocab_limit)

    def token_step(self, cache, logits, positions, forced, forced_ids, done, sampling, stop_ids,
                   bias=None, penalties=None):  # fmt: skip
        """One position of every row: choose its token, then run it through the model.

        Args:
            cache: the model's cache; row `b` holds positions `0..positions[b]-1`.
            logits: `(B, V)` logits of each row's position `positions[b] - 1`.
            positions: `(B,)` int32 position of each row's token.
            forced, forced_ids: `(B,)` rows whose token is given (a prompt's), and it.
            done: `(B,)` bool rows that are finished (their token is 0).
            sampling: `(temperature (B,), top_k (B,), top_p (B,), seeds (B,))`.
            stop_ids: `(K,)` int32 tokens that end a row (after being emitted).
            bias: optional `(B, V)` float32 added to the logits (`logit_bias`, a grammar's
                mask).
            penalties: optional `(presence, frequency, repetition, counts, seen)`
                (`generation.penalties`), applied after `bias`; updated with the token.

        Returns:
            `(token, stopped, logprob, top_ids, top_logprobs, entropy, logits, cache,
            penalties)`: `(B,)` tokens, whether each sampled a stop id, their statistics
            (`(B,)`, `(B, TOP_LOGPROBS)`; zeros without `logprobs`), the next logits
            `(B, V)`, the penalty state (None without).
        """
        batch = tf.shape(logits)[0]
        top = TOP_LOGPROBS if self.logprobs else 0
        if bias is not None:
            logits = logits + tf.cast(bias, logits.dtype)
        if penalties is not None:
            logits = pen.apply_penalties(logits, penalties)
        sampled = sample_tokens(logits, *sampling, positions)  # (B,)
        token = tf.where(forced, forced_ids, sampled)
        token = tf.where(done, tf.zeros_like(token), token)
        if penalties is not None:
            drawn = tf.logical_not(tf.logical_or(forced, done))
            penalties = pen.record(penalties, token, drawn)
        logprob, entropy = tf.zeros((batch,)), tf.zeros((batch,))
        top_ids, top_lps = tf.zeros((batch, top), tf.int32), tf.zeros((batch, top))
        if self.logprobs:
            log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)  # (B, V)
            logprob = tf.gather(log_probs, token, axis=1, batch_dims=1)  # (B,)
            top_lps, top_ids = tf.math.top_k(log_probs, top)  # (B, top)
            entropy = -tf.reduce_sum(tf.exp(log_probs) * log_probs, axis=-1)  # (B,)
        is_stop = tf.reduce_any(token[:, None] == stop_ids[None, :], -1)
        stopped = tf.logical_and(tf.logical_not(forced), is_stop)
        step_logits, cache = self.model.call_with_cache(token[:, None], cache, positions)
        logits = self._limit(step_logits[:, -1, :])
        return token, stopped, logprob, top_ids, top_lps, entropy, logits, cache, penalties

    def _decode(self, ids, is_prompt, cache, logits, positions, steps, ends, done, sampling,
                stop_ids, bias=None, penalties=None):  # fmt: skip
        """Decodes up to `steps` positions of every row (fewer when every row is done).

        Args:
            ids: `(B, S)` int32 tokens: the prompts, then what is decoded.
            is_prompt: `(B, S)` bool: prompt positions (forced, not sampled).
            cache: the model's cache; row `b` holds positions `0..positions[b]-1`.
            logits: `(B, V)` logits of each row's position `positions[b] - 1`.
            positions: `(B,)` int32 each row's next position.
            steps: int32 scalar.
            ends: `(B,)` int32: a row is done once it reaches this position.
            done: `(B,)` bool: rows already finished (padding, cancelled).
            sampling: `(temperature (B,), top_k (B,), top_p (B,), seeds (B,))`.
            stop_ids: `(K,)` int32 tokens that end a row (after being emitted).
            bias: optional `(B, V)` float32 logit biases (`logit_bias`).
            penalties: optional penalty settings and state (see `token_step`).

        Returns:
            `(steps_run, positions, ids, cache, logits, done, logprobs, top_ids,
            top_logprobs, entropy, penalties)`; `logprobs` and `entropy` are `(B, S)`, the
            tops `(B, S, TOP_LOGPROBS)`, all zeros without `logprobs`; `penalties` the
            updated state (`()` without).
        """
        batch, length = tf.shape(ids)[0], tf.shape(ids)[1]
        top = TOP_LOGPROBS if self.logprobs else 0
        logprobs = tf.zeros((batch, length), tf.float32)
        entropy = tf.zeros((batch, length), tf.float32)
        top_ids = tf.zeros((batch, length, top), tf.int32)
        top_lps = tf.zeros((batch, length, top), tf.float32)
        rows = tf.range(batch)

        def cond(j, i, ids, cache, logits, done, logprobs, top_ids, top_lps, entropy, state):
            return tf.logical_and(j < steps, tf.logical_not(tf.reduce_all(done)))

        def body(j, i, ids, cache, logits, done, logprobs, top_ids, top_lps, entropy, state):
            index = tf.stack([rows, i], axis=1)  # (B, 2)
            forced = tf.gather_nd(is_prompt, index)  # (B,)
            out = self.token_step(cache, logits, i, forced, tf.gather_nd(ids, index), done,
                                  sampling, stop_ids, bias, state or None)  # fmt: skip
            token, stopped, logprob, best_ids, best_lps, spread, logits, cache, state = out
            ids = tf.tensor_scatter_nd_update(ids, index, token)
            if self.logprobs:
                logprobs = tf.tensor_scatter_nd_update(logprobs, index, logprob)
                top_ids = tf.tensor_scatter_nd_update(top_ids, index, best_ids)
                top_lps = tf.tensor_scatter_nd_update(top_lps, index, best_lps)
                entropy = tf.tensor_scatter_nd_update(entropy, index, spread)
            done = tf.logical_or(done, tf.logical_or(stopped, i + 1 >= ends))
            i = tf.minimum(i + 1, length - 1)  # a finished row stays inside its cache
            state = state or ()
            return j + 1, i, ids, cache, logits, done, logprobs, top_ids, top_lps, entropy, state

        loop = (0, positions, ids, cache, logits, done, logprobs, top_ids, top_lps, entropy,
                tuple(penalties or ()))  # fmt: skip
        return tf.while_loop(cond, body, loop)


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
    """

    def __init__(self, model, jit_compile: bool = True, logprobs: bool = False, vocab_limit=None):
        self.model = model
        self.loop = DecodeLoop(model, jit_compile, logprobs, vocab_limit)

    def start(self, rows: Sequence[Row], stop_ids: Sequence[int] = ()) -> DecodeState:
        """Prefills `rows` (each `len(prompt) + max_new_tokens <= model.max_seq_len`)."""
        n = len(rows)
        batch = pad_batch(n)
        ends = [len(r.prompt) + r.max_new_tokens for r in rows]
        cache_len = cache_length(max(ends), self.model.max_seq_len)
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
