"""`deepseek-tf info (RUN_DIR | --preset NAME | --config FILE)`: config and parameter counts."""

from __future__ import annotations

import json

import yaml


def add_parser(subparsers) -> None:
    from deepseek_tf.cli.common import add_config_args

    parser = subparsers.add_parser("info", help="show a run's or preset's config and size")
    parser.add_argument("run_dir", nargs="?")
    add_config_args(parser)
    parser.add_argument("--presets", action="store_true", help="list the bundled presets")
    parser.set_defaults(func=run, tensorflow=lambda args: not args.presets)


def run(args) -> int:
    from deepseek_tf.config.loader import config_to_dict, preset_description, preset_names

    if args.presets:  # without TensorFlow: answers at once
        names = preset_names()
        width = max(map(len, names))
        for name in names:
            print(f"{name:<{width}}  {preset_description(name)}")
        return 0
    from deepseek_tf.cli.common import resolve_config
    from deepseek_tf.models.builder import parameter_count
    from deepseek_tf.rundir import RunDir

    config = RunDir(args.run_dir).read_config() if args.run_dir else resolve_config(args)
    vocab = config.model.vocab_size or _vocab_from_data(config)
    counts = parameter_count(config, vocab)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip())
    print(json.dumps({"parameters": counts, "vocab_size": vocab}))
    print(f"parameters: {human(counts['total'])} total, {human(counts['activated'])} "
          "activated per token")  # fmt: skip
    if args.run_dir:
        print(training_state(RunDir(args.run_dir)))
    if args.run_dir:
        for entry in RunDir(
            args.run_dir
        ).read_history():  # what `deepseek-tf compress` did to the run
            print(json.dumps({"compression": entry}))
    return 0


def _vocab_from_data(config) -> int:
    """Vocabulary a fresh run would get: distinct characters, or the BPE target size."""
    if config.data.prepared:
        from deepseek_tf.data.prepared import read_manifest

        return read_manifest(config.data.prepared)["vocab_size"]
    if config.data.tokenizer == "bpe":
        return config.data.vocab_size
    if config.data.tokenizer != "char":  # a tokenizer file or directory
        from deepseek_tf.tokenizers import load_tokenizer_path

        return load_tokenizer_path(config.data.tokenizer).vocab_size
    from deepseek_tf.data.corpus import read_texts, resolve_files

    return len(set().union(*map(set, read_texts(resolve_files(config.data.files)))))


def human(n: int) -> str:
    """`671026419200` -> `"671.0B"` (the exact count is printed beside it)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def training_state(run) -> str:
    """One line: the run's last step and validation loss (from its metrics)."""
    entries = run.metrics.read()
    steps = [e["step"] for e in entries if "step" in e]
    evals = [e for e in entries if "val_loss" in e]
    if not steps:
        return "training: no steps recorded"
    line = f"training: step {max(steps)} of {run.read_config().train.steps}"
    if evals:
        best = min(evals, key=lambda e: e["val_loss"])
        line += f"; last val loss {evals[-1]['val_loss']:.4f} (step {evals[-1]['step']})"
        line += f", best {best['val_loss']:.4f} (step {best['step']})"
    return line
