"""`deepseek-tf train`: train a preset or config; `--resume` continues a run."""

from __future__ import annotations

import time
from pathlib import Path

from deepseek_tf.cli.common import add_config_args, resolve_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (default: shakespeare-char)")
    add_config_args(parser)
    parser.add_argument("--out", help="run directory (default: runs/<preset>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=300,
        help="tokens of sample text printed after training (0: none)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from deepseek_tf.api import train
    from deepseek_tf.config.loader import apply_overrides, load_run_config
    from deepseek_tf.errors import ConfigError

    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        if (Path(args.out) / "config.yaml").exists():
            if args.preset or args.config:
                raise ConfigError("--resume continues the run's own config; drop --preset/--config")
            config = apply_overrides(load_run_config(args.out), args.overrides)
        else:
            config = resolve_config(args)
    else:
        config = resolve_config(args)
    out = args.out or f"runs/{args.preset or 'shakespeare-char'}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train(config, out, resume=args.resume)
    print(
        f"[train] done: {summary['step']} steps, {summary['train_tokens_per_sec']:.0f} "
        f"tokens/s, checkpoint {summary['checkpoint']}"
    )
    if args.sample_tokens > 0:
        from deepseek_tf.cli.generate_cmd import sample_text

        print("--- sample ---")
        print(
            sample_text(out, "\n", args.sample_tokens, temperature=0.8, top_k=0, top_p=1.0, seed=0)[
                0
            ]
        )
    return 0
