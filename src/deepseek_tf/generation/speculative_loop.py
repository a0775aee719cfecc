"""The compiled side of speculative decoding (see `generation.speculative`): prefill of
the model and its MTP chain, and the draft-verify rounds in one XLA while-loop.

Every row of a batch sits at its own position: a round settles each row's accepted
drafts plus one token, so a row that accepts more moves further (positions are `(B,)`
vectors; prefill starts all rows at one scalar position). The cache writes and reads
take per-row positions (`layers.cache_positions`)."""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.generation.decoding import prefill_chunks, prepare_decoding
from deepseek_tf.generation.memory_bound import xla_decode, xla_prefill
from deepseek_tf.generation.sampler import limit_vocab, sample_tokens
from deepseek_tf.generation.speculative_sampling import (
    DRAFT_NOISE,
    accept_drafts,
    sample_probs,
    token_probs,
)
from deepseek_tf.layers.cache_positions import write_cache


def rewind_conv(block, old, new, block_input, offset):
    """`new` (a block's cache after a call over `T` positions) with a hybrid block's conv
    state set to what it was after the first `offset` of them (attention caches need no
    rewinding: later calls overwrite the rejected positions)."""
    if "conv" not in new:
        return new
    h = block.attn_norm(block_input)  # (B, T, C): the conv's input
    padded = tf.concat([tf.cast(old["conv"], h.dtype), h], axis=1)  # (B, K-1+T, C)
    width = old["conv"].shape[1]
    state = window(padded, offset, width)  # (B, K-1, C)
    return {**new, "conv": tf.cast(state, old["conv"].dtype)}


def window(x, start, width: int):
    """`x[:, start : start + width]` of a `(B, L, ...)` tensor for a traced `start`, a
    scalar or per row `(B,)` (a gather: XLA's constant inference aborts on some traced
    `tf.slice` bounds)."""
    start = tf.convert_to_tensor(start, tf.int32)
    if start.shape.rank == 1:
        index = start[:, None] + tf.range(width)[None, :]  # (B, W)
        return tf.gather(x, index, axis=1, batch_dims=1)
    return tf.gather(x, start + tf.range(width), axis=1)


def at(x, position):
    """`x[:, position]` of a `(B, L, ...)` tensor, `position` a scalar or per row `(B,)`."""
    return window(x, position, 1)[:, 0]


def put(ids, position, values):
    """`ids` `(B, L)` with column `position` (a scalar or per row) set to `values` `(B,)`."""
    column = tf.reshape(tf.convert_to_tensor(position, tf.int32), (-1, 1))  # (B|1, 1)
    hit = tf.range(tf.shape(ids)[1])[None, :] == column  # (B|1, L)
    return tf.ensure_shape(tf.where(hit, values[:, None], ids), ids.shape)


class SpeculativeLoop:
    """The compiled prefill and draft-verify rounds of one model (see the module doc).

    Args:
        model: a `CausalLM` with MTP modules.
        draft_tokens: drafts per round (`k`, at most the number of MTP modules).
        jit_compile: compile with XLA.
        vocab_limit: ids the tokenizer can decode (see `DecodeLoop`).
    """

    def __init__(self, model, draft_tokens: int, jit_compile: bool = True, vocab_limit=None):
        prepare_decoding(model)
        self.model = model
        self.k = draft_tokens
        self.modules = model.mtp_modules[:draft_tokens]
        self.vocab_limit = vocab_limit if vocab_limit and vocab_limit < model.vocab_size else None
        rounds = xla_decode(model, jit_compile)  # as plain decoding's loop and prefill
        compiled = dict(jit_compile=rounds, reduce_retracing=True, autograph=False)
        prefill = {**compiled, "jit_compile": xla_prefill(model, jit_compile)}
        self.prefill_chunk = tf.function(self._prefill_chunk, **prefill)
        self.prefill_last = tf.function(self._prefill_last, **prefill)
        self.rounds = tf.function(self._rounds, **compiled)

    def init_state(self, batch: int, cache_len: int) -> dict:
        """Zeroed caches: the main model's, each MTP module's, and the outputs of depths
        `1 .. k-1` per position (the next depth's inputs)."""
        c = self.model.d_model
        dtype = self.model.compute_dtype
        return {
            "cache": self.model.init_cache(batch, cache_len),
            "mtp": [m.init_cache(batch, cache_len) for m in self.modules],
            "outputs": [tf.zeros((batch, cache_len, c), dtype) for _ in self.modules[1:]],
        }

    def _draft(self, hidden, start, settled, ids, is_prompt, state, sampling, sampled, draft=True):
        """Runs the MTP chain after the main model ran positions `start ..` (normed
        states `hidden` `(B, T, C)`) and settled every token up to `settled`; with
        `draft`, drafts positions `settled+1 .. settled+k` into `ids` (argmaxes unless
        `sampled`: a Python bool, so a greedy batch traces no sampling). Returns `(ids,
        state, q)`: `q` `(B, k, V)` the drafts' distributions (zeros when greedy)."""
        temperature, top_k, top_p, seeds = sampling
        t = tf.shape(hidden)[1]
        mtp, outputs, q = list(state["mtp"]), list(state["outputs"]), []
        for j, module in enumerate(self.modules, start=1):
            length = t + j - 1  # depth j also redoes the j-1 positions before `start`
            begin = tf.maximum(start - (j - 1), 0)
            if j > 1:  # depth j-1's outputs, the ones before this round's from earlier
                hidden = window(outputs[j - 2], begin, length)
            ahead = window(ids, begin + j, length)  # (B, length): tokens j on
            out = module(hidden, self.model.embed(ahead), cache=mtp[j - 1], cache_index=begin)
            offset = tf.maximum(settled - j + 1, 0) - begin  # where depth j starts next round
            mtp[j - 1] = rewind_conv(
                module.block, mtp[j - 1], out["cache"], out["block_input"], offset
            )
            if j < self.k:  # (B, L, C) <- (B, length, C) at `begin`
                outputs[j - 1] = write_cache(outputs[j - 1], out["x"], begin)
            hidden = out["x"]
            if not draft:
                continue
            # (B, C): at settled - 1 (a finished row has not moved: any row will do)
            last = at(out["x"], tf.maximum(settled - 1 - begin, 0))
            logits = self.model.project(last[:, None])[:, 0] / self.model.logit_temperature
            logits = limit_vocab(logits, self.vocab_limit)  # (B, V)
            position = settled + j
            if sampled:
                probs = token_probs(logits, temperature, top_k, top_p)  # (B, V)
                token = sample_probs(probs, seeds, position + DRAFT_NOISE)
            else:
                probs = tf.zeros_like(logits)
                token = tf.argmax(logits, -1, output_type=tf.int32)
            token = tf.where(at(is_prompt, position), at(ids, position), token)
            ids = put(ids, position, token)
            q.append(probs)
        q = tf.stack(q, axis=1) if draft else None
        return ids, {**state, "mtp": mtp, "outputs": outputs}, q

    def prefill(self, prompts, ids, is_prompt, state, ends, done, sampling, stop_ids, sampled):
        """Runs the prompts' first `P` tokens (`prompts` `(B, P)`, numpy) through the model
        in the `prefill_chunks(P)` calls plain decoding makes, each also running the MTP
        chain over its positions; the last samples position `P` as plain decoding does
        and drafts after it. Returns `(ids, state, q, done)`."""
        chunks = prefill_chunks(prompts.shape[1])
        at = 0
        for n in chunks[:-1]:
            chunk, start = tf.constant(prompts[:, at : at + n]), tf.constant(at, tf.int32)
            state = self.prefill_chunk(chunk, start, ids, is_prompt, state, sampling)
            at += n
        chunk, start = tf.constant(prompts[:, at:]), tf.constant(at, tf.int32)
        args = (ids, is_prompt, state, ends, done, sampling, stop_ids, sampled)
        return self.prefill_last(chunk, start, *args)

    def _prefill_chunk(self, chunk, start, ids, is_prompt, state, sampling):
        """A chunk the prompts go on after: the model and the MTP chain, no drafts."""
        _, cache, extras = self.model.call_with_cache(
            chunk, state["cache"], start, return_hidden=True
        )
        settled = start + tf.shape(chunk)[1]
        args = (ids, is_prompt, {**state, "cache": cache}, sampling, False)
        return self._draft(extras["hidden"], start, settled, *args, draft=False)[1]

    def _prefill_last(self, chunk, start, ids, is_prompt, state, ends, done, sampling, stop_ids,
                      sampled):  # fmt: skip
        last = tf.shape(chunk)[1] - 1
        logits, cache, extras = self.model.call_with_cache(
            chunk, state["cache"], start, return_hidden=True, logits_at=last
        )
        logits = limit_vocab(logits[:, 0], self.vocab_limit)  # (B, V)
        p = start + tf.shape(chunk)[1]
        if sampled:
            first = sample_tokens(logits, *sampling, p)  # (B,)
        else:
            first = tf.argmax(logits, axis=-1, output_type=tf.int32)
        first = tf.where(at(is_prompt, p), at(ids, p), first)
        ids = put(ids, p, first)
        done = finish_rows(ids, is_prompt, ends, done, p, 1, 1, stop_ids)
        state = {**state, "cache": cache}
        ids, state, q = self._draft(
            extras["hidden"], start, p, ids, is_prompt, state, sampling, sampled
        )
        return ids, state, q, done

    def _rounds(self, position, ids, is_prompt, state, q, ends, done, sampling, stop_ids, limit,
                sampled):  # fmt: skip
        """Runs draft-verify rounds from each row's settled position (`position` `(B,)`)
        until every row is done or `limit` rounds ran (`sampled`: see `_draft`). A row
        keeps its own accepted drafts; a finished row stays where it is. Returns
        `(rounds, position, ids, state, q, done, proposed (k,), accepted (k,))`: drafts
        offered (by unfinished rows, prompt positions excluded) and accepted, per
        position."""
        k = self.k
        blocks = self.model.blocks

        def cond(rounds, position, ids, state, q, done, proposed, accepted):
            return tf.logical_and(rounds < limit, tf.logical_not(tf.reduce_all(done)))

        def body(rounds, position, ids, state, q, done, proposed, accepted):
            tokens = window(ids, position, k + 1)  # (B, k+1): last, drafts
            forced = window(is_prompt, position + 1, k + 1)  # (B, k+1)
            logits, cache, extras = self.model.call_with_cache(
                tokens, state["cache"], position, return_hidden=True
            )
            logits = limit_vocab(logits, self.vocab_limit)  # (B, k+1, V)
            kept, replacement = accept_drafts(
                logits, tokens[:, 1:], q, forced, sampling, position + 1, sampled
            )
            active = tf.logical_not(done)
            n = tf.where(active, kept, 0)  # (B,): drafts each row keeps
            settled = tf.where(active, position + n + 1, position)  # (B,)
            token = at(replacement, n)  # the rejected draft's replacement, or the bonus
            keep = tf.logical_or(done, at(is_prompt, settled))  # finished rows: unchanged
            ids = put(ids, settled, tf.where(keep, at(ids, settled), token))
            offered = tf.logical_and(active[:, None], tf.logical_not(forced[:, :k]))  # (B, k)
            took = tf.logical_and(offered, kept[:, None] > tf.range(k)[None, :])
            proposed += tf.reduce_sum(tf.cast(offered, tf.int32), axis=0)
            accepted += tf.reduce_sum(tf.cast(took, tf.int32), axis=0)
            done = finish_rows(ids, is_prompt, ends, done, position + 1, n + 1, k + 1, stop_ids)
            cache = [
                rewind_conv(block, old, new, inputs, n + 1)
                for block, old, new, inputs in zip(
                    blocks, state["cache"], cache, extras["block_inputs"]
                )
            ]
            state = {**state, "cache": cache}
            ids, state, q = self._draft(
                extras["hidden"], position, settled, ids, is_prompt, state, sampling, sampled
            )
            return rounds + 1, settled, ids, state, q, done, proposed, accepted

        zeros = tf.zeros((k,), tf.int32)
        start = (tf.constant(0, tf.int32), position, ids, state, q, done, zeros, zeros)
        return tf.while_loop(cond, body, start)


def finish_rows(ids, is_prompt, ends, done, first, count, width, stop_ids):
    """`done` `(B,)` updated for the tokens just settled at positions `first ..
    first+count-1` (scalars or per row; `count <= width`, `width` static): a row ends at
    a sampled stop token or once it reaches `ends`."""
    offsets = tf.range(width)[None, :]  # (1, W)
    positions = tf.reshape(first, (-1, 1)) + offsets  # (B|1, W)
    tokens = window(ids, first, width)  # (B, W)
    prompt = window(is_prompt, first, width)  # (B, W)
    new = tf.logical_and(offsets < tf.reshape(count, (-1, 1)), tf.logical_not(prompt))
    new = tf.logical_and(new, positions < ends[:, None])  # (B, W)
    is_stop = tf.reduce_any(tokens[:, :, None] == stop_ids[None, None, :], axis=-1)  # (B, W)
    stopped = tf.reduce_any(tf.logical_and(new, is_stop), axis=1)
    return done | stopped | (first + count >= ends)
