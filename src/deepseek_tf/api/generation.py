"""Generating text from a run: `generate` (a run directory) and `generate_texts` (a model
and tokenizer in memory), through the compiled KV-cache decode loop.

`deepseek-tf generate` prints what `generate` returns; its flags are the keywords
(`--max-new-tokens` -> `max_new_tokens`, `--prompt` -> `prompt`).

Examples:

>>> from deepseek_tf.api.generation import generate                       # doctest: +SKIP
>>> generate("runs/shakespeare", "ROMEO:", max_new_tokens=50, temperature=0)  # doctest: +SKIP
['ROMEO:\\nWhat ...']
>>> generate("runs/chat", ["Hi!", "Who are you?"], chat=True)             # doctest: +SKIP
['Hello! ...', 'I am ...']
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from deepseek_tf.errors import InputError
from deepseek_tf.generation.generate import MAX_NEW_TOKENS, Generator
from deepseek_tf.generation.sampler import SamplingError, check_sampling
from deepseek_tf.generation.speculative import cannot_gain
from deepseek_tf.rundir import load_run

__all__ = ["check_generation_options", "generate", "generate_texts"]


def check_generation_options(
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    speculative: str | None = None,
    draft_tokens: int | None = None,
    show_uncertainty: bool = False,
) -> None:
    """The server's rules for sampling settings, and the combinations `generate` refuses,
    as one-line `InputError`s named by the command's flags (checked before a model loads)."""
    try:
        check_sampling(temperature, top_k, top_p, seed)
    except SamplingError as e:
        raise InputError(f"--{e.param.replace('_', '-')}: {e}") from None
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not (0 <= max_new_tokens <= MAX_NEW_TOKENS)
    ):
        raise InputError(
            f"--max-new-tokens: must be between 0 and {MAX_NEW_TOKENS:,} (past the context a "
            f"sliding window continues), got {max_new_tokens!r}"
        )
    if speculative not in (None, "mtp"):
        raise InputError(f"--speculative: mtp (or off), got {speculative!r}")
    if draft_tokens is not None and not speculative:
        raise InputError("--draft-tokens needs --speculative mtp")
    if draft_tokens is not None and draft_tokens < 1:
        raise InputError(f"--draft-tokens must be >= 1, got {draft_tokens}")
    if speculative and show_uncertainty:
        raise InputError("--show-uncertainty is not available with --speculative")


def _stop_ids(tokenizer, stop: Sequence[str]) -> list[int]:
    """The ids of the `stop` texts (one token each) and the tokenizer's EOS."""
    ids = []
    for text in stop:
        encoded = tokenizer.encode(text)
        if len(encoded) != 1:
            raise InputError(f"--stop {text!r} is {len(encoded)} tokens; a stop must be one token")
        ids.append(encoded[0])
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    chat: bool = False,
    details: bool = False,
    speculative: str | None = None,
    draft_tokens: int | None = None,
) -> list:
    """The continuations of `prompts` by a loaded `model` and its `tokenizer` (what
    `generate` does once the run is loaded; the options are `generate`'s, `details` is its
    `show_uncertainty`, and they are not checked again here)."""
    generator = Generator(
        model, vocab_limit=tokenizer.vocab_size, speculative=speculative, draft_tokens=draft_tokens
    )  # (refuses a model without MTP modules)
    note = cannot_gain(model) if speculative else None
    if note:  # said, not refused: the output is the same, only slower
        print(f"[generate] warning: {note}", file=sys.stderr, flush=True)
    prompts = list(prompts)
    if chat:
        encoded = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        prompts = ["" for _ in prompts]  # the replies alone
    else:
        encoded = [tokenizer.encode_prompt(p) for p in prompts]
    new = generator.generate(encoded, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop_ids=_stop_ids(tokenizer, stop),
                             details=details)  # fmt: skip

    def text(ids):  # a chat reply ends at EOS, which is not part of it
        if chat and ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        return tokenizer.decode(ids)

    if not details:
        return [p + text(ids) for p, ids in zip(prompts, new)]
    return [
        (
            p + text(d["tokens"]),
            [(tokenizer.decode([t]), float(h), float(lp))
             for t, h, lp in zip(d["tokens"], d["entropy"], d["logprob"])],
        )
        for p, d in zip(prompts, new)
    ]  # fmt: skip


def generate(
    run_dir,
    prompt: str | Sequence[str],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    chat: bool = False,
    show_uncertainty: bool = False,
    speculative: str | None = None,
    draft_tokens: int | None = None,
) -> list:
    """Continues each prompt with the run's model (batched, with the KV cache).

    Args:
        run_dir: the run (it needs a tokenizer).
        prompt: a text, or a list of texts decoded as one batch.
        max_new_tokens: tokens generated per prompt (past the context a sliding window
            continues).
        temperature: 0 is greedy.
        top_k: keep the k likeliest tokens (0: no filter).
        top_p: nucleus filter (1: none).
        seed: the random numbers of sampling (prompt i of a batch samples with seed + i).
        stop: texts of one token each that end a continuation (with the EOS token).
        chat: each prompt is one user message rendered with the run's chat template;
            the results are the replies alone, ending at EOS.
        show_uncertainty: return per-token entropies and log-probabilities too.
        speculative: "mtp": the model's MTP modules draft tokens one pass verifies
            (greedy output unchanged; sampling keeps its distribution).
        draft_tokens: with `speculative`: drafts per round (None: one per MTP module).

    Returns:
        One text per prompt (the prompt and its continuation; with `chat` the reply); with
        `show_uncertainty`, `(text, [(token text, entropy in nats, log-probability), ...])`
        per prompt.

    Raises:
        InputError: a setting out of range, a stop text that is not one token, a run
            without tokenizer, a prompt longer than the context.

    Examples:

    >>> generate("runs/tiny", "Th", max_new_tokens=5, temperature=0)  # doctest: +SKIP
    ['The ki']
    """
    check_generation_options(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        speculative=speculative,
        draft_tokens=draft_tokens,
        show_uncertainty=show_uncertainty,
    )
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    model, tokenizer = load_run(run_dir)
    if tokenizer is None:
        raise InputError(f"{run_dir} has no tokenizer; generate from token ids with the Python API")
    return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop=stop, chat=chat, details=show_uncertainty,
                          speculative=speculative, draft_tokens=draft_tokens)  # fmt: skip
