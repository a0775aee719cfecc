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
    parser.set_defaults(func=run, api="deepseek_tf.api.generation:generate")


UNCERTAIN_NATS = 2.0  # --show-uncertainty marks tokens drawn from a wider distribution


def run(args) -> int:
    from deepseek_tf.api.generation import generate

    texts = generate(
        args.run_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
        show_uncertainty=args.show_uncertainty,
        speculative=args.speculative,
        draft_tokens=args.draft_tokens,
    )
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
