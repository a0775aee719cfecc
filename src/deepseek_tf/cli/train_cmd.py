"""`deepseek-tf train`: train a preset or config; `--resume` continues a run."""

from __future__ import annotations

import time

from deepseek_tf.cli.common import add_config_args, resolve_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model (default: shakespeare-char)")
    add_config_args(parser)
    parser.add_argument("--out", help="run directory (default: runs/<preset>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--init-from",
        metavar="RUN_OR_HF_DIR",
        help="fine-tune: start from this run's or Hugging Face checkpoint's weights and "
        "tokenizer, with a fresh optimizer (its model section; --config gives train/data; "
        "LoRA with --set train.lora_rank=R)",
    )
    parser.add_argument(
        "--batch-size",
        help="sequences per step (overrides train.batch_size), or 'auto': the largest batch "
        "whose step fits --memory-budget",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=0,
        metavar="MIB",
        help="--batch-size auto: memory one training step may add, per device (default: 80%% "
        "of the GPU's memory, or of the available RAM)",
    )
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=300,
        help="tokens of sample text printed after training (0: none)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from deepseek_tf.api import train
    from deepseek_tf.config.loader import apply_overrides
    from deepseek_tf.errors import ConfigError
    from deepseek_tf.rundir import RunDir

    if args.resume and args.init_from:
        raise ConfigError("--init-from starts a new run; --resume continues one (pick one)")
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        if args.preset or args.config:
            raise ConfigError("--resume continues the run's own config; drop --preset/--config")
        # the run's own config; a directory that holds no run is an error, never a new run
        config = apply_overrides(RunDir(args.out).read_config(), args.overrides)
    elif args.init_from:
        if not args.out:
            raise ConfigError("--init-from needs --out NEW_RUN_DIR")
        from deepseek_tf.config.loader import load_config
        from deepseek_tf.training.init_from import init_config

        base = (
            load_config(preset=args.preset, path=args.config)
            if (args.preset or args.config)
            else None
        )
        config, _ = init_config(args.init_from, base, args.overrides)
    else:
        config = resolve_config(args)
    if args.sample_tokens < 0:
        raise ConfigError(f"--sample-tokens: must be >= 0, got {args.sample_tokens}")
    if args.batch_size:
        config = _batch_size(config, args)
    out = args.out or f"runs/{args.preset or 'shakespeare-char'}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = train(config, out, resume=args.resume, init_from=args.init_from)
    if summary.get("already_complete") or not summary["chief"]:
        return 0  # (other workers write no run directory)
    from deepseek_tf.training.report import summary_lines

    if args.sample_tokens > 0:
        from deepseek_tf.cli.generate_cmd import sample_text
        from deepseek_tf.errors import TokenizerError

        kwargs = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0}
        try:  # a sample is a courtesy: a vocabulary without "\n" gets none
            text = sample_text(out, "\n", args.sample_tokens, **kwargs)[0]
            print(f"--- sample ---\n{text}\n---")
        except TokenizerError as e:
            print(f"(no sample: {e})")
    bundled = not (config.data.files or config.data.prepared)
    prompt = "ROMEO:" if bundled else "Once upon a time"  # the bundled corpus
    print("\n".join(summary_lines(summary, prompt)), flush=True)
    return 0


def _batch_size(config, args):
    """`--batch-size N` or `--batch-size auto` (measured; see `training.autobatch`)."""
    import dataclasses

    from deepseek_tf.config.loader import apply_overrides
    from deepseek_tf.errors import ConfigError

    if args.batch_size != "auto":
        if not args.batch_size.isdigit():
            raise ConfigError(
                f"--batch-size: a positive integer or 'auto', got {args.batch_size!r}"
            )
        return apply_overrides(config, [f"train.batch_size={args.batch_size}"])
    if config.runtime.strategy in ("multi_worker", "tpu"):
        raise ConfigError(
            f"--batch-size auto measures one device; set train.batch_size for "
            f"runtime.strategy={config.runtime.strategy}"
        )
    from deepseek_tf.api import prepare_tokenizer
    from deepseek_tf.training.autobatch import MIB, find_batch_size
    from deepseek_tf.training.runtime import configure_threads, make_strategy

    configure_threads(config.runtime)
    replicas = make_strategy(config.runtime).num_replicas_in_sync
    resolved, tokenizer = prepare_tokenizer(config, args.out, args.resume)
    budget = int(args.memory_budget * MIB) if args.memory_budget else None
    found = find_batch_size(resolved, tokenizer.vocab_size, budget)
    batch = found["batch_size"] * replicas  # the probe measured one device
    print(
        f"[batch-size auto] {found['batch_size']} sequences of {found['seq_len']} tokens per "
        f"device x {replicas} device(s) = global batch {batch} (step ~"
        f"{found['confirmed_step_mib']:.0f} MiB of {found['budget_mib']:.0f} MiB budget; "
        f"{found['per_sequence_mib']:.2f} MiB per sequence)",
        flush=True,
    )
    return dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch))
