"""Arguments shared by several subcommands, and how a command names its library function.

Every (sub)command parser declares the function it calls with
`parser.set_defaults(func=run, api="module:function")` (or a tuple of such strings): its
option dests are that function's keyword arguments (`tests/test_api_surface.py`).
"""

from __future__ import annotations

import importlib


def add_config_args(parser) -> None:
    """`--preset NAME | --config FILE` (dests `preset`, `config`) and `--set`."""
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


def api_function(spec: str):
    """The function named by an `api` default, `"deepseek_tf.api.training:train"`."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def keywords(args, *, skip=()) -> dict:
    """The parsed options of a command as keyword arguments of its library function: every
    dest except the parser's own bookkeeping (`func`, `api`, `command`, ...) and `skip`."""
    bookkeeping = {"func", "api", "command", "verbose", "tensorflow", *skip}
    return {
        k: v for k, v in vars(args).items() if k not in bookkeeping and not k.endswith("_command")
    }
