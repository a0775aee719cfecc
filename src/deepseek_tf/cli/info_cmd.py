"""`deepseek-tf info (RUN_DIR | --preset NAME | --config FILE)`: config and parameter counts.

Parses, calls `deepseek_tf.api.info.info` and prints its result. `--presets` answers at
once, without TensorFlow: it reads the presets through the config layer (what
`info(presets=True)` returns), not through `deepseek_tf.api`, which loads TensorFlow.
"""

from __future__ import annotations

import json

import yaml

from deepseek_tf.cli.common import add_config_args, api_function, keywords

API = "deepseek_tf.api.info:info"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show a run's or preset's config and size")
    parser.add_argument("run_dir", nargs="?")
    add_config_args(parser)
    parser.add_argument("--presets", action="store_true", help="list the bundled presets")
    parser.set_defaults(func=run, api=API, tensorflow=lambda args: not args.presets)


def run(args) -> int:
    if args.presets:  # without TensorFlow
        from deepseek_tf.config.loader import preset_description, preset_names

        names = preset_names()
        width = max(map(len, names))
        for name in names:
            print(f"{name:<{width}}  {preset_description(name)}")
        return 0
    result = api_function(args.api)(**keywords(args))
    counts = result["parameters"]
    print(yaml.safe_dump(result["config"], sort_keys=False).rstrip())
    print(json.dumps({"parameters": counts, "vocab_size": result["vocab_size"]}))
    saved = counts["shared_saving"]
    shared = f" ({human(saved)} saved by sharing adjacent layers)" if saved else ""
    print(f"parameters: {human(counts['total'])} total, {human(counts['activated'])} "
          f"activated per token{shared}")  # fmt: skip
    if result["training"] is not None:
        print(training_line(result["training"]))
    for entry in result["compression"]:  # what `deepseek-tf compress` did to the run
        print(json.dumps({"compression": entry}))
    return 0


def human(n: int) -> str:
    """`671026419200` -> `"671.0B"` (the exact count is printed beside it)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def training_line(state: dict) -> str:
    """One line: the run's last step and validation losses (`info`'s `training`)."""
    if state["step"] is None:
        return "training: no steps recorded"
    line = f"training: step {state['step']} of {state['steps']}"
    if state["last_val_loss"] is not None:
        line += f"; last val loss {state['last_val_loss']:.4f} (step {state['last_val_step']})"
        line += f", best {state['best_val_loss']:.4f} (step {state['best_val_step']})"
    return line + f"; the model is the {state['weights']} weights"
