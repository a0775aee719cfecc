"""The command line's verbs as Python functions, with the command's own options.

`evaluate`, `generate`, `export_run`, `serve`, `compress_run` and `convert_checkpoint`
take the options of `deepseek-tf eval | generate | export | serve | compress | convert`
as keyword arguments named like the flags (`--max-new-tokens` -> `max_new_tokens`),
with the same defaults and checks: the options are declared once, by the command's
parser, and each function parses its required arguments with that parser, then sets
the keywords given. The command and the function then run the same code; the command
prints what the function returns.

Examples:

>>> import deepseek_tf as ds  # doctest: +SKIP
>>> ds.evaluate("runs/shakespeare")["loss"]  # doctest: +SKIP
1.7466
>>> ds.generate("runs/shakespeare", "ROMEO:", max_new_tokens=50, temperature=0)  # doctest: +SKIP
['ROMEO:...']
>>> with ds.serve("runs/shakespeare", port=0) as served:  # doctest: +SKIP
...     served.wait_ready()
...     print(served.url)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import threading
import time

from deepseek_tf.cli.compress_cmd import METHODS
from deepseek_tf.cli.convert_cmd import convert
from deepseek_tf.cli.eval_cmd import evaluate as run_eval
from deepseek_tf.cli.export_cmd import export_run as run_export
from deepseek_tf.cli.generate_cmd import generate_texts
from deepseek_tf.cli.main import build_parser
from deepseek_tf.cli.serve_cmd import start
from deepseek_tf.errors import ConfigError


# argparse has no public way to list a parser's actions or subparsers; `_actions`,
# `_SubParsersAction` and the action classes below are stable since Python 3.2.
def _command_parser(parser: argparse.ArgumentParser, names: list[str]):
    """The subparser of `names` (e.g. ["compress", "quantize"]) under `parser`."""
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _flags(action: argparse.Action, value) -> list[str]:
    """The command-line words that set `action` to `value`."""
    flag = max(action.option_strings, key=len)  # the long form
    if isinstance(action, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(action, argparse._StoreFalseAction):
        return [] if value else [flag]
    if value is None:
        return []
    if isinstance(action, argparse._AppendAction):  # flag=value: a value may start with -
        return [f"{flag}={v}" for v in value]
    if action.nargs in ("+", "*"):
        return [flag, *map(str, value)]
    return [f"{flag}={value}"]


def _args(argv: list[str], options: dict) -> argparse.Namespace:
    """`deepseek-tf ARGV` plus `options` as their flags, parsed by the command line's
    own parser: its defaults, types, choices and required options apply."""
    parser = build_parser()
    names = argv[:2] if argv[0] == "compress" else argv[:1]
    actions = {a.dest: a for a in _command_parser(parser, names)._actions if a.option_strings}
    actions.pop("help", None)
    words = list(argv)
    for key, value in options.items():
        if key not in actions:
            raise ConfigError(
                f"{' '.join(names)}: unknown option {key!r}; the options are "
                f"{', '.join(sorted(actions))}"
            )
        words += _flags(actions[key], value)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(words)
    except SystemExit:
        last = errors.getvalue().strip().splitlines()[-1:] or ["invalid options"]
        raise ConfigError(last[0].replace("deepseek-tf ", "", 1)) from None


def evaluate(run_dir, **options) -> dict:
    """`deepseek-tf eval RUN_DIR`: loss, perplexity, accuracy (and with
    `uncertainty=True` calibration and OOD scores) of the run on `data` (file patterns)
    or its validation split."""
    return run_eval(_args(["eval", str(run_dir)], options))


def generate(run_dir, prompts, **options) -> list:
    """`deepseek-tf generate RUN_DIR --prompt ...`: the continuation of each prompt (a
    string or a list of strings), as a list of texts. `chat=True` renders each prompt
    as a user message with the run's chat template and returns the replies alone;
    `show_uncertainty=True` returns `(text, [(token, entropy, logprob), ...])` pairs."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return generate_texts(_args(["generate", str(run_dir)], {"prompt": prompts, **options}))


def export_run(run_dir, out, format: str = "savedmodel", **options) -> dict:  # noqa: A002
    """`deepseek-tf export RUN_DIR --format FORMAT --out OUT`: the exporter's report
    (verified against the Keras model unless `no_verify=True`)."""
    argv = ["export", str(run_dir), "--format", format, "--out", str(out)]
    return run_export(_args(argv, options))


def compress_run(method: str, run_dir, out, **options) -> dict:
    """`deepseek-tf compress METHOD RUN_DIR --out OUT` (quantize, qat, prune, distill,
    lowrank): the record of what was done, also appended to `OUT/compression.json`."""
    if method not in METHODS:
        raise ConfigError(f"compress: unknown method {method!r}; one of {', '.join(METHODS)}")
    args = _args(["compress", method, str(run_dir), "--out", str(out)], options)
    return importlib.import_module(f"deepseek_tf.compress.{method}").run(args)


def convert_checkpoint(*, out, from_hf=None, to_hf=None, **options):
    """`deepseek-tf convert --from-hf HF_DIR | --to-hf RUN_DIR --out OUT`: the
    conversion's summary (`.describe()` is the line the command prints)."""
    if (from_hf is None) == (to_hf is None):
        raise ConfigError("convert: give exactly one of from_hf and to_hf")
    source = ["--from-hf", str(from_hf)] if from_hf is not None else ["--to-hf", str(to_hf)]
    return convert(_args(["convert", *source, "--out", str(out)], options))


class Served:
    """A server started by `serve(..., block=False)`: `url`, `app`, `wait_ready()`,
    `close()`; a context manager that closes it."""

    def __init__(self, app, server, url):
        self.app, self.server, self.url = app, server, url
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 600.0) -> bool:
        """Waits until `/health` answers 200 (shapes compiled); False after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.app.ready:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.batcher.stop()
        self._thread.join(timeout=10)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(run_dir, *, block: bool = False, **options):
    """`deepseek-tf serve RUN_DIR`: the OpenAI-compatible server (127.0.0.1:8000 by
    default; `port=0` picks a free port). `block=False` returns a running `Served`;
    `block=True` serves until interrupted, as the command does."""
    args = _args(["serve", str(run_dir)], options)
    app, server, url = start(args)
    served = Served(app, server, url)
    if block:
        try:
            served._thread.join()
        finally:
            served.close()
    return served
