"""Arguments shared by several subcommands."""

from __future__ import annotations


def add_config_args(parser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a bundled preset (see `deepseek-tf info --presets`)")
    source.add_argument("--config", help="a YAML config file")
    add_override_arg(parser, "override one config value (repeatable), e.g. --set train.steps=100")


def add_override_arg(parser, help_text: str) -> None:
    """`--set SECTION.KEY=VALUE`, repeatable, collected in `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=help_text,
    )


def resolve_config(args):
    from deepseek_tf.config.loader import load_config

    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)
