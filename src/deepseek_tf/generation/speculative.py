"""Speculative decoding with the model's own Multi-Token Prediction modules.

Each round the MTP chain has drafted `k` tokens after the last settled one; one cached
call of the main model over `[last, d_1 .. d_k]` (positions `s .. s+k`) scores them all.
Greedy rows keep drafts while they equal the argmax and take the argmax at the first
mismatch, so the output is plain greedy decoding's, token for token. Sampled rows use
speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft `d ~ q` is kept
with probability `min(1, p(d) / q(d))`, else the token is drawn from
`normalize(max(p - q, 0))`; `p` and `q` are the *filtered* distributions the plain
sampler draws from (`sampler.filter_logits`: temperature, top-k, top-p), so every token
follows plain sampling's distribution exactly (not its random stream: draws are keyed
by seed, position and purpose, `uniform_noise`). Each round settles `n + 1` tokens.

Then depth 1 runs once, cached, over the verified positions (the main model's normed
final state there and the embeddings of the tokens one ahead) and drafts the next
`d_1`; depth `j` chains depth `j - 1`'s output and also recomputes the `j - 1` earlier
positions whose inputs were drafts. Cache entries written for rejected positions lie
beyond every later query until the next round overwrites them. A hybrid block's conv
state is rewound to the last settled position (`rewind_conv`).

Each row of a batch has its own position: a round settles each row's own accepted
drafts plus one token, so a batch gains what its rows gain (rows once shared one
position and kept the fewest drafts any row accepted). A row whose prompt is longer
than the shortest is fed its remaining prompt as forced drafts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import InputError
from deepseek_tf.generation.decoder import Row
from deepseek_tf.generation.decoding import CACHE_BUCKET, pad_batch
from deepseek_tf.generation.memory_bound import fits_in_cache, last_level_cache_bytes, weight_bytes
from deepseek_tf.generation.speculative_loop import SpeculativeLoop

MAX_ROUNDS = 1 << 30  # `step()` without a limit


def check_draft_tokens(model, draft_tokens: int | None) -> int:
    """Draft tokens per round: `draft_tokens`, or None for one per MTP module.

    Raises:
        InputError: the model has no MTP modules, or `draft_tokens` is not in
            `[1, number of MTP modules]`.
    """
    depth = len(model.mtp_modules)
    if depth == 0:
        raise InputError(
            "speculative decoding (mtp) needs a model with MTP modules (model.mtp_depth > 0); "
            "this model has none"
        )
    if draft_tokens is None:
        return depth
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, (int, np.integer)):
        raise InputError(f"draft tokens must be an integer, got {draft_tokens!r}")
    if not 1 <= draft_tokens <= depth:
        raise InputError(
            f"draft tokens must be between 1 and {depth} (the model's MTP modules), "
            f"got {draft_tokens}"
        )
    return int(draft_tokens)


def cannot_gain(model, cache_bytes: int | None = None) -> str | None:
    """Why speculative decoding cannot pay for `model` on this machine, or None.

    A verify pass over `k + 1` positions costs about one decoding step only while a step
    is bound by reading the weights from memory. When every weight fits in the CPU's
    last-level cache (`cache_bytes`; read from the system when None), a step is bound by
    compute, the pass costs about `k + 1` steps, and no acceptance rate pays back the
    drafts (`benchmarks/speculative.py`: 0.89x at batch 1 on a 2M-parameter model). On a
    GPU, or where the cache size is unknown, it says nothing.
    """
    if tf.config.list_logical_devices("GPU"):
        return None
    cache_bytes = last_level_cache_bytes() if cache_bytes is None else cache_bytes
    if not fits_in_cache(model, cache_bytes):
        return None
    weights = weight_bytes(model)
    return (
        f"--speculative mtp: the model's {weights / 2**20:.1f} MiB of weights fit in this "
        f"CPU's {cache_bytes / 2**20:.0f} MiB cache, so a pass that verifies drafts costs "
        "about as many steps as it checks tokens and speculation cannot gain here; plain "
        "decoding is faster (speculation pays on models too large for the cache)"
    )


class SpeculativeDecoder:
    """Host side of speculative decoding: lays out a batch of `Row`s (as `Decoder`
    does), prefills, and runs draft-verify rounds (all, or a few at a time).

    Args:
        model: a `CausalLM` with MTP modules (`model.mtp_depth > 0`).
        draft_tokens: drafts per round (None: one per MTP module).
        jit_compile: compile prefill and rounds with XLA.
        vocab_limit: ids the tokenizer can decode (see `DecodeLoop`).

    Raises:
        InputError: the model has no MTP modules, or `draft_tokens` is out of range.

    Examples:
    >>> decoder = SpeculativeDecoder(model)  # doctest: +SKIP
    >>> state = decoder.start([Row([5, 6, 7], max_new_tokens=20)])  # doctest: +SKIP
    >>> state.step(rounds=1), state.last_round  # doctest: +SKIP
    ([[12, 40]], (1, 1))
    >>> state.step()  # the rest  # doctest: +SKIP
    """

    def __init__(self, model, draft_tokens: int | None = None, jit_compile=True, vocab_limit=None):
        self.model = model
        self.draft_tokens = check_draft_tokens(model, draft_tokens)
        self.loop = SpeculativeLoop(model, self.draft_tokens, jit_compile, vocab_limit)
        self.proposed = np.zeros(self.draft_tokens, np.int64)  # over every state
        self.accepted = np.zeros(self.draft_tokens, np.int64)
        self.rounds = 0

    def start(self, rows: Sequence[Row], stop_ids: Sequence[int] = ()) -> SpeculativeState:
        """Prefills `rows` (each `len(prompt) + max_new_tokens <= model.max_seq_len`) and
        settles each row's first position after the shortest prompt."""
        n, k = len(rows), self.draft_tokens
        batch = pad_batch(n)
        ends = [len(r.prompt) + r.max_new_tokens for r in rows] + [1] * (batch - n)
        # verification and drafting run up to k positions past the last end
        cache_len = -(-(max(ends) + k) // CACHE_BUCKET) * CACHE_BUCKET
        ids = np.zeros((batch, cache_len + 2 * k + 2), np.int32)
        is_prompt = np.zeros(ids.shape, bool)
        for i, r in enumerate(rows):
            ids[i, : len(r.prompt)] = r.prompt
            is_prompt[i, : len(r.prompt)] = True
        start = min(len(r.prompt) for r in rows)  # prefilled; the rest forced as drafts
        pad = [0] * (batch - n)
        state = SpeculativeState(self, rows, stop_ids)
        state.sampling = (
            tf.constant([r.temperature for r in rows] + pad, tf.float32),
            tf.constant([r.top_k for r in rows] + pad, tf.int32),
            tf.constant([r.top_p for r in rows] + [1.0] * len(pad), tf.float32),
            tf.constant([r.seed for r in rows] + pad, tf.int32),
        )
        state.ends = tf.constant(ends, tf.int32)
        state.is_prompt = tf.constant(is_prompt)
        state.ids, state.state, state.q, done = self.loop.prefill(
            ids[:, :start],
            tf.constant(ids),
            state.is_prompt,
            self.loop.init_state(batch, cache_len),
            state.ends,
            tf.constant([False] * n + [True] * (batch - n)),
            state.sampling,
            state.stop_ids,
            state.sampled,
        )
        state.done = done.numpy().copy()
        state.position = np.full(batch, start, np.int32)  # each row's last settled position
        return state


class SpeculativeState:
    """The running speculative decode of one batch (made by `SpeculativeDecoder.start`).

    Attributes:
        proposed, accepted: `(k,)` drafts offered and accepted per draft position so
            far (prompt positions and finished rows excluded); `accepted[i] /
            proposed[i]` is the acceptance rate of the `i+1`-th draft.
        last_round: `(drafted, accepted)` totals of the last `step` call.
    """

    def __init__(self, decoder: SpeculativeDecoder, rows: Sequence[Row], stop_ids):
        self.decoder = decoder
        self.rows = list(rows)
        self.stop_set = {int(t) for t in stop_ids}
        self.stop_ids = tf.constant(sorted(self.stop_set) or [-1], tf.int32)
        self.sampled = any(r.temperature > 0 for r in rows)  # else the greedy-only loop
        self.reported = [len(r.prompt) for r in rows]  # next position to report, per row
        self.closed = [False] * len(rows)  # fully reported
        k = decoder.draft_tokens
        self.proposed, self.accepted = np.zeros(k, np.int64), np.zeros(k, np.int64)
        self.rounds, self.last_round = 0, (0, 0)

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def cancel(self, row: int) -> None:
        """Stops decoding `row` (its client left, or it reached a stop string)."""
        self.done[row] = True
        self.closed[row] = True

    def step(self, rounds: int | None = None) -> list[list[int]]:
        """Runs up to `rounds` draft-verify rounds (None: to the end); returns each
        row's new tokens (a stop token is included and ends the row)."""
        if not self.finished:
            out = self.decoder.loop.rounds(
                tf.constant(self.position),
                self.ids,
                self.is_prompt,
                self.state,
                self.q,
                self.ends,
                tf.constant(self.done),
                self.sampling,
                self.stop_ids,
                tf.constant(MAX_ROUNDS if rounds is None else rounds, tf.int32),
                self.sampled,
            )
            ran, position, self.ids, self.state, self.q, done, proposed, accepted = out
            self.position, self.done = position.numpy().copy(), done.numpy().copy()
            proposed, accepted = proposed.numpy(), accepted.numpy()
            self.proposed += proposed
            self.accepted += accepted
            self.rounds += int(ran)
            self.last_round = (int(proposed.sum()), int(accepted.sum()))
            self.decoder.proposed += proposed
            self.decoder.accepted += accepted
            self.decoder.rounds += int(ran)
        ids = self.ids.numpy()
        new = []
        for row, r in enumerate(self.rows):
            tokens = []
            if not self.closed[row]:
                last = min(int(self.position[row]) + 1, len(r.prompt) + r.max_new_tokens)
                for i in range(self.reported[row], last):
                    tokens.append(int(ids[row, i]))
                    if tokens[-1] in self.stop_set:
                        break
                self.reported[row] = max(last, self.reported[row])
                self.closed[row] = bool(self.done[row])
            new.append(tokens)
        return new
