"""The command line and the Python API cannot drift apart.

- Only `deepseek_tf/cli/` imports argparse: the library takes typed keyword arguments.
- Every (sub)command parser names its library function (`set_defaults(api=...)`), and
  each of its options is a keyword parameter of that function (of one of them, for a
  command that dispatches to several), with the same default where both have one.
"""

import argparse
import ast
import importlib
import inspect
import pathlib

import pytest

from deepseek_tf.cli.main import build_parser

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "deepseek_tf"
# dests that are the parser's bookkeeping or CLI-only presentation, not keywords
NOT_KEYWORDS = {
    "help", "version", "verbose", "func", "api", "command", "method", "data_command",
    "tokenizer_command", "tensorflow",
}  # fmt: skip


def _argparse_importers() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "cli" in path.relative_to(SRC).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n.split(".")[0] == "argparse" for n in names):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    return found


def test_only_the_cli_imports_argparse():
    assert not _argparse_importers(), "argparse outside cli/: " + ", ".join(_argparse_importers())


def test_the_argparse_scan_finds_an_import(tmp_path, monkeypatch):
    """The scan itself can fail: a library module importing argparse is caught."""
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "main.py").write_text("import argparse\n")
    (tmp_path / "verbs.py").write_text("import os\nfrom argparse import Namespace\n")
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    assert _argparse_importers() == ["verbs.py:2"]


def _subparsers(parser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _commands(parser, path=()):
    """`(("compress", "quantize"), parser)` for every parser that runs a command (the
    leaves of the tree of subparsers). argparse has no public way to list them:
    `_actions` and `_SubParsersAction` are stable since Python 3.2."""
    subs = _subparsers(parser)
    if not subs:
        yield path, parser
        return
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _commands(child, (*path, name))


COMMANDS = dict(_commands(build_parser()))


def _functions(parser) -> list:
    spec = parser.get_default("api")
    assert spec, f"{parser.prog}: no set_defaults(api='module:function')"
    specs = (spec,) if isinstance(spec, str) else tuple(spec)
    out = []
    for one in specs:
        module, name = one.split(":")
        out.append(getattr(importlib.import_module(module), name))
    return out


def _same(a, b) -> bool:
    """Defaults agree: equal values, a list and a tuple of the same items alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def drift(parser) -> list[str]:
    """What is wrong between `parser`'s options and its library function(s)."""
    functions = _functions(parser)
    signatures = [inspect.signature(f).parameters for f in functions]
    problems = []
    for action in parser._actions:
        dest = action.dest
        if dest in NOT_KEYWORDS or dest == argparse.SUPPRESS:
            continue
        flag = max(action.option_strings, key=len) if action.option_strings else dest
        owners = [p[dest] for p in signatures if dest in p]
        if not owners:
            names = ", ".join(f.__qualname__ for f in functions)
            problems.append(f"{flag} (dest {dest!r}) is not a keyword of {names}")
            continue
        cli_default = action.default
        if action.required or cli_default is None or cli_default == argparse.SUPPRESS:
            continue  # a required option, or one the function decides when absent
        for param in owners:
            if param.default is not inspect.Parameter.empty and not _same(
                param.default, cli_default
            ):
                problems.append(
                    f"{flag}: the command's default is {cli_default!r}, the function's "
                    f"{param.default!r}"
                )
    return problems


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_option_is_a_keyword_of_the_commands_function(path):
    problems = drift(COMMANDS[path])
    assert not problems, f"deepseek-tf {' '.join(path)}:\n" + "\n".join(problems)


def test_the_walk_reaches_nested_commands():
    assert {("train",), ("federated",), ("info",), ("data", "prepare"),
            ("tokenizer", "train")} <= set(COMMANDS)  # fmt: skip
    assert any(len(path) == 2 and path[0] == "compress" for path in COMMANDS)


def test_the_drift_check_finds_drift():
    """A flag without a keyword, and a default that differs, are both reported."""

    def verb(run_dir, *, steps: int = 5, out=None):
        """A made-up library function."""

    verb.__module__ = __name__
    globals()["_made_up_verb"] = verb
    parser = argparse.ArgumentParser(prog="made-up")
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out")
    parser.add_argument("--max-tokens", type=int, default=3)
    parser.set_defaults(api=f"{__name__}:_made_up_verb")
    problems = drift(parser)
    assert len(problems) == 2, problems
    assert "--steps: the command's default is 6" in problems[0]
    assert "--max-tokens (dest 'max_tokens') is not a keyword" in problems[1]
