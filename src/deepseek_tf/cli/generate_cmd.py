"""`deepseek-tf generate RUN_DIR --prompt TEXT`: sample text with the KV cache."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text from a trained run")
    parser.add_argument("run_dir")
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text (repeat for a batch of prompts)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop when this text (one token) is generated; repeatable",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="each --prompt is a user message: render it with the run's chat template "
        "(a converted checkpoint's own) and print only the reply, which ends at EOS",
    )
    parser.add_argument(
        "--show-uncertainty",
        action="store_true",
        help="after the text, one line per generated token: its text, the entropy (nats) of "
        "the distribution it was drawn from, its log-probability, and ! above 2 nats",
    )
    parser.add_argument(
        "--speculative",
        choices=["mtp"],
        help="speculative decoding: the model's MTP modules draft tokens that one pass of "
        "the model verifies (same greedy output; sampling keeps its distribution)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=int,
        help="with --speculative: tokens drafted per round (default: one per MTP module)",
    )
    parser.set_defaults(func=run)


UNCERTAIN_NATS = 2.0  # --show-uncertainty marks tokens drawn from a wider distribution


def sample_text(
    run_dir,
    prompts,
    max_new_tokens,
    *,
    temperature,
    top_k,
    top_p,
    seed,
    stop=(),
    details=False,
    chat=False,
    speculative=None,
    draft_tokens=None,
) -> list:
    """The prompts' continuations: texts, or with `details` `(text, [(token text, entropy,
    logprob), ...])` per prompt. With `chat` each prompt is one user message rendered by
    the run's chat template, and the texts are the replies alone. `speculative="mtp"`
    decodes speculatively with `draft_tokens` drafts per round (see `Generator`)."""
    from deepseek_tf.api import load
    from deepseek_tf.errors import InputError
    from deepseek_tf.generation.generate import Generator

    model, tokenizer = load(run_dir)
    if tokenizer is None:
        raise InputError(f"{run_dir} has no tokenizer; generate from token ids with the Python API")
    generator = Generator(
        model, vocab_limit=tokenizer.vocab_size, speculative=speculative, draft_tokens=draft_tokens
    )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    stop_ids = []
    for text in stop:
        ids = tokenizer.encode(text)
        if len(ids) != 1:
            raise InputError(f"--stop {text!r} is {len(ids)} tokens; a stop must be one token")
        stop_ids.append(ids[0])
    if tokenizer.eos_id is not None:
        stop_ids.append(tokenizer.eos_id)
    if chat:
        encoded = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in prompts]
        prompts = ["" for _ in prompts]  # print the replies alone
    else:
        encoded = [tokenizer.encode_prompt(p) for p in prompts]
    new = generator.generate(
        encoded,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_ids=stop_ids,
        details=details,
    )

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


def check_options(args) -> None:
    """The server's rules for sampling settings, checked before the model loads."""
    from deepseek_tf.errors import InputError
    from deepseek_tf.generation.generate import MAX_NEW_TOKENS
    from deepseek_tf.generation.sampler import SamplingError, check_sampling

    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except SamplingError as e:
        raise InputError(f"--{e.param.replace('_', '-')}: {e}") from None
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise InputError(
            f"--max-new-tokens: must be between 0 and {MAX_NEW_TOKENS:,} (past the context a "
            f"sliding window continues), got {args.max_new_tokens}"
        )
    if args.draft_tokens is not None and not args.speculative:
        raise InputError("--draft-tokens needs --speculative mtp")
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise InputError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.speculative and args.show_uncertainty:
        raise InputError("--show-uncertainty is not available with --speculative")


def generate_texts(args) -> list:
    """What `generate` prints, for parsed `args` (`deepseek_tf.generate` calls it too)."""
    check_options(args)
    return sample_text(
        args.run_dir,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        details=args.show_uncertainty,
        chat=args.chat,
        speculative=args.speculative,
        draft_tokens=args.draft_tokens,
    )


def run(args) -> int:
    texts = generate_texts(args)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- {i} ---")
        if not args.show_uncertainty:
            print(text)
            continue
        text, tokens = text
        print(text)
        print(f"--- uncertainty: token, entropy (nats), log-probability; ! above "
              f"{UNCERTAIN_NATS:g} nats ---")  # fmt: skip
        for token, entropy, logprob in tokens:
            mark = " !" if entropy > UNCERTAIN_NATS else ""
            print(f"{token!r}\t{entropy:.3f}\t{logprob:.3f}{mark}")
    return 0
