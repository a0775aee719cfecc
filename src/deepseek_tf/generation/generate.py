"""Generation from token ids through the one decode loop, and its uncached reference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from deepseek_tf.errors import InputError
from deepseek_tf.generation import decode_layout
from deepseek_tf.generation.decoder import Decoder, Row
from deepseek_tf.generation.penalties import Penalties, check_penalties
from deepseek_tf.generation.sampler import (
    SEED_MODULUS,
    SamplingParams,
    check_logit_bias,
    check_sampling,
)
from deepseek_tf.generation.speculative import SpeculativeDecoder


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


SPECULATIVE = (None, "mtp")
MAX_NEW_TOKENS = 1_000_000  # per call; past the context a sliding window continues


def row_seeds(seed: int, n: int, round_index: int = 0) -> list[int]:
    """Per-row seeds of a batch decoded with one `seed`: row `i` samples with
    `seed + i` (so a prompt alone and the first prompt of a batch agree); each
    sliding-window round shifts them so that its draws are new."""
    return [(seed + i + 7919 * round_index) % SEED_MODULUS for i in range(n)]


class Generator:
    """Batched autoregressive decoding with a KV cache, through the one decode loop.

    `generate` lays the prompts out as `Row`s for a `Decoder` (`generation.decoding`) and
    runs the compiled loop to the end. Sequences longer than the model's context continue
    in a sliding window: the last half-context is re-encoded.

    With `speculative="mtp"` the model's MTP modules draft `draft_tokens` tokens per
    round and one pass of the model verifies them (`generation.speculative`): greedy
    output is plain decoding's, sampled output follows the same distribution (drawn
    from other random numbers); `speculative_stats` counts the drafts.

    On a CPU, a model whose 16-bit weights do not fit in the cache is put in the decode
    layout (`generation.decode_layout`: its kernels held `(out, in)`; save it only after
    `decode_layout.restore`).

    Args:
        model: a `CausalLM`.
        jit_compile: compile prefill and the decoding loop with XLA.
        vocab_limit: ids the tokenizer can decode (`tokenizer.vocab_size`; see
            `DecodeLoop`); None: every id of the model.
        speculative: None (plain decoding) or `"mtp"`.
        draft_tokens: drafts per round with `speculative="mtp"` (None: one per MTP
            module).

    Raises:
        InputError: `speculative` is unknown, the model has no MTP modules, or
            `draft_tokens` is out of range.

    Examples:
    >>> Generator(model, speculative="mtp").generate([[1, 2, 3]], 20)  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        jit_compile: bool = True,
        vocab_limit: int | None = None,
        speculative: str | None = None,
        draft_tokens: int | None = None,
    ):
        self.model = model
        self.jit_compile = jit_compile
        self.vocab_limit = vocab_limit
        if jit_compile and decode_layout.wanted(model):  # 16-bit weights read from memory
            decode_layout.apply(model)
        self.decoder = Decoder(model, jit_compile, vocab_limit=vocab_limit)
        self._detailed = None  # the loop with log-probabilities and entropies, on demand
        if speculative not in SPECULATIVE:
            raise InputError(f"speculative must be one of {SPECULATIVE}, got {speculative!r}")
        self.speculative = None
        if speculative == "mtp":
            self.speculative = SpeculativeDecoder(model, draft_tokens, jit_compile, vocab_limit)

    @property
    def speculative_stats(self) -> dict | None:
        """Drafts offered (`"proposed"`) and accepted per draft position, and verify
        rounds, over every `generate` call (None without `speculative`)."""
        spec = self.speculative
        if spec is None:
            return None
        return {
            "proposed": spec.proposed.tolist(),
            "accepted": spec.accepted.tolist(),
            "rounds": spec.rounds,
        }

    def _run_window(self, prompts, max_new, sampling: SamplingParams, seeds, stop_ids, details,
                    bias=(), penalties: Penalties | None = None):  # fmt: skip
        """Decodes `max_new` tokens after each prompt, all within the context."""
        s, penalties = sampling, penalties or Penalties()
        rows = [Row(p, max_new, s.temperature, s.top_k, s.top_p, seed, bias, penalties)
                for p, seed in zip(prompts, seeds)]  # fmt: skip
        if self.speculative is not None:
            if details:
                raise InputError("speculative decoding does not report log-probabilities")
            if bias or penalties.active:
                raise InputError("speculative decoding does not take logit_bias or penalties")
            new = self.speculative.start(rows, stop_ids).step()
            new = [[(t, 0.0, [], 0.0) for t in row] for row in new]
            return [(row, bool(row) and row[-1][0] in set(stop_ids)) for row in new]
        if details and self._detailed is None:
            self._detailed = Decoder(self.model, self.jit_compile, True, self.vocab_limit)
        decoder = self._detailed if details else self.decoder
        new = decoder.start(rows, stop_ids).step()
        stop_set = set(stop_ids)
        return [(row, bool(row) and row[-1][0] in stop_set) for row in new]

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
        details: bool = False,
        logit_bias: Mapping | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
    ) -> list:
        """Returns the new tokens of each prompt (a stop token ends a row, and is kept).

        Sampling settings follow `sampler.check_sampling` (the server's rules); row `i`
        samples with seed `seed + i`. `logit_bias` (`{token id: bias in [-100, 100]}`, as
        the server takes it) is added to every row's logits before sampling, then the
        penalties (`generation.penalties`: OpenAI's presence/frequency, vLLM's repetition;
        a window slid past the context forgets what it dropped). With
        `details`, each prompt gets a dict instead: `"tokens"`, and arrays `"logprob"` (of
        each chosen token under the model) and `"entropy"` (nats, of the distribution it
        was drawn from: its uncertainty).
        """
        model = self.model
        _check_prompts(prompts, model.vocab_size, model.max_seq_len)
        sampling = check_sampling(temperature, top_k, top_p, seed)
        bias = check_logit_bias(logit_bias, model.vocab_size)
        penalties = check_penalties(presence_penalty, frequency_penalty, repetition_penalty)
        if isinstance(max_new_tokens, bool) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(
                f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS:,} (a sliding window "
                f"continues past the context), got {max_new_tokens}"
            )
        context = model.max_seq_len
        sequences = [list(map(int, p)) for p in prompts]
        new = [[] for _ in prompts]  # (token, logprob, alternatives, entropy) entries
        finished = [False] * len(prompts)
        remaining, round_index = max_new_tokens, 0
        while remaining > 0 and not all(finished):
            if max(len(s) for s in sequences) + remaining > context:
                sequences = [s[-max(context // 2, 1) :] for s in sequences]  # sliding window
            n = min(remaining, context - max(len(s) for s in sequences))
            seeds = row_seeds(sampling.seed, len(sequences), round_index)
            window = self._run_window(
                sequences, n, sampling, seeds, list(stop_ids), details, bias, penalties
            )
            for row, (entries, stopped) in enumerate(window):
                if finished[row]:
                    continue
                new[row].extend(entries)
                sequences[row] = sequences[row] + [e[0] for e in entries]
                finished[row] = stopped
            remaining -= n
            round_index += 1
        if not details:
            return [[e[0] for e in row] for row in new]
        return [
            {
                "tokens": [e[0] for e in row],
                "logprob": np.asarray([e[1] for e in row], np.float32),
                "entropy": np.asarray([e[3] for e in row], np.float32),
            }
            for row in new
        ]


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
