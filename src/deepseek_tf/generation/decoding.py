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

import tensorflow as tf

from deepseek_tf.generation import decode_layout
from deepseek_tf.generation import penalties as pen
from deepseek_tf.generation.memory_bound import memory_bound_on_cpu, xla_decode, xla_prefill
from deepseek_tf.generation.sampler import constrain, follow_grammar, limit_vocab, sample_tokens
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


def cache_length(total: int, max_seq_len: int, power_of_two: bool = False) -> int:
    """Cache positions for sequences of up to `total` tokens: a multiple of
    `CACHE_BUCKET`, or with `power_of_two` a power of two times it (fewer shapes where
    each costs an XLA compilation: `DecodeLoop.xla_step`).

    >>> cache_length(200, 4096), cache_length(200, 4096, power_of_two=True)
    (256, 256)
    >>> cache_length(300, 4096), cache_length(300, 4096, power_of_two=True)
    (320, 512)
    """
    buckets = -(-int(total) // CACHE_BUCKET)
    if power_of_two:
        buckets = 1 << (buckets - 1).bit_length()
    return min(buckets * CACHE_BUCKET, max_seq_len)


def prepare_decoding(model) -> None:
    """Brings the weights that layers derive for decoding up to date (MLA's absorbed
    kernels, `MultiHeadLatentAttention.prepare_decoding`); every decode loop calls it
    when it is made."""
    dtype = "float32" if decode_layout.applied(model) else None  # (see prepare_decoding)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, MultiHeadLatentAttention):
            layer.prepare_decoding(dtype)


def positional_cache(model) -> bool:
    """True when every layer's cache is indexed by position (attention keys and values,
    MLA latents), with no running state (a hybrid block's convolution keeps its last
    inputs): then a call may write past the positions it needs, for later tokens to
    overwrite."""
    return all(getattr(block, "conv", None) is None for block in model.blocks)


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

    Attributes:
        jit_compile: whether the token step and the decode loop are compiled with XLA.
        xla_step: whether, the loop left uncompiled, its batch-1 token step is (a model
            in the decode layout, `generation.decode_layout`); its cache lengths are then
            powers of two (`cache_length`), each a compilation.
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
        # a model in the decode layout: the batch-1 step under XLA inside an uncompiled
        # loop (in a compiled loop XLA hoists float32 copies of every weight out of it)
        self.xla_step = jit_compile and not self.jit_compile and decode_layout.applied(model)
        self._xla_token_step = (
            tf.function(self.token_step, **{**compiled, "jit_compile": True})
            if self.xla_step
            else None
        )
        self.prefill_jit_compile = xla_prefill(model, jit_compile, cache_bytes)
        prefill = {**compiled, "jit_compile": self.prefill_jit_compile}
        self.prefill_program = tf.function(self._prefill_chunk, **prefill)
        # a model read from memory on a CPU (so prefilled without XLA): its first prefill
        # runs eagerly (see prefill_chunk)
        self._eager_prefill = memory_bound_on_cpu(model, cache_bytes)
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
                   bias=None, penalties=None, grammar=None):  # fmt: skip
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
            grammar: optional `(table, classes, dead, which, states)` token automata
                (`sampler.constrain`): each row samples only what its state allows, then
                follows its token; a row whose document is complete stops.

        Returns:
            `(token, stopped, logprob, top_ids, top_logprobs, entropy, logits, cache,
            penalties, grammar)`: `(B,)` tokens, whether each sampled a stop id (or ended
            its grammar), their statistics (`(B,)`, `(B, TOP_LOGPROBS)`; zeros without
            `logprobs`), the next logits `(B, V)`, the penalty state and the grammar
            (None without).
        """
        batch = tf.shape(logits)[0]
        top = TOP_LOGPROBS if self.logprobs else 0
        if bias is not None:
            logits = logits + tf.cast(bias, logits.dtype)
        if grammar is not None:
            logits = constrain(logits, grammar)
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
        if grammar is not None:
            grammar, ended = follow_grammar(grammar, token, tf.logical_not(forced | done))
            stopped = tf.logical_or(stopped, ended)
        step_logits, cache = self.model.call_with_cache(
            token[:, None], cache, positions, active=tf.logical_not(done)
        )
        logits = self._limit(step_logits[:, -1, :])
        return (token, stopped, logprob, top_ids, top_lps, entropy, logits, cache, penalties,
                grammar)  # fmt: skip

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
        step = self._xla_token_step if self.xla_step and ids.shape[0] == 1 else self.token_step

        def cond(j, i, ids, cache, logits, done, logprobs, top_ids, top_lps, entropy, state):
            return tf.logical_and(j < steps, tf.logical_not(tf.reduce_all(done)))

        def body(j, i, ids, cache, logits, done, logprobs, top_ids, top_lps, entropy, state):
            index = tf.stack([rows, i], axis=1)  # (B, 2)
            forced = tf.gather_nd(is_prompt, index)  # (B,)
            out = step(cache, logits, i, forced, tf.gather_nd(ids, index), done, sampling,
                       stop_ids, bias, state or None)  # fmt: skip
            token, stopped, logprob, best_ids, best_lps, spread, logits, cache, state, _ = out
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
