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
    from deepseek_tf.config.loader import config_to_dict, preset_names

    if args.presets:  # without TensorFlow: answers at once
        print("\n".join(preset_names()))
        return 0
    from deepseek_tf.cli.common import resolve_config
    from deepseek_tf.models.builder import parameter_count
    from deepseek_tf.rundir import RunDir

    config = RunDir(args.run_dir).read_config() if args.run_dir else resolve_config(args)
    vocab = config.model.vocab_size or _vocab_from_data(config)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip())
    print(json.dumps({"parameters": parameter_count(config, vocab), "vocab_size": vocab}))
    if args.run_dir:
        for entry in RunDir(
            args.run_dir
        ).read_history():  # what `deepseek-tf compress` did to the run
            print(json.dumps({"compression": entry}))
    return 0


def _vocab_from_data(config) -> int:
    """Vocabulary a fresh run would get: distinct characters, or the BPE target size."""
    if config.data.tokenizer == "bpe":
        return config.data.vocab_size
    from deepseek_tf.data.corpus import read_texts, resolve_files

    return len(set().union(*map(set, read_texts(resolve_files(config.data.files)))))
