"""The README works as written: its Python blocks run (in order, in a fresh directory) and
every `deepseek-tf` command line of its bash blocks parses, the cheap ones run."""

import pathlib
import re
import shlex

import pytest

from deepseek_tf.cli.main import build_parser, main

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FIRST_LINES = (
    "```bash\n"
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && deepseek-tf train\n"
    'pip install -e ".[test]" && python -m pytest\n'
    "```\n"
)
RUN_FOR_REAL = (["info", "--presets"], ["info", "--preset", "deepseek-v3"])


def blocks(language: str, text: str | None = None) -> list[str]:
    """The fenced code blocks of `language` in the README (or `text`)."""
    text = README.read_text(encoding="utf-8") if text is None else text
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def command_lines(block: str) -> list[list[str]]:
    """The `deepseek-tf` invocations of a bash block, as argv lists (without the program):
    continued lines joined, comments dropped, `a && b` and `a; b` split, environment
    assignments before the command skipped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "&", "|", "||"):
                if "deepseek-tf" in command:
                    found.append(command[command.index("deepseek-tf") + 1 :])
                command = []
            else:
                command.append(word)
    return found


def test_the_first_lines_are_the_two_set_up_commands():
    assert README.read_text(encoding="utf-8").startswith(FIRST_LINES)


def test_the_command_extraction_finds_every_form():
    text = (
        "```bash\n"
        "pip install -e . && deepseek-tf train   # comment\n"
        "TF_CONFIG='{\"a\": 1}' \\\n    deepseek-tf info --preset x\n"
        "tensorboard --logdir runs\n"
        "```\n"
    )
    (block,) = blocks("bash", text)
    assert command_lines(block) == [["train"], ["info", "--preset", "x"]]


COMMANDS = [argv for block in blocks("bash") for argv in command_lines(block)]


def test_the_readme_has_commands_and_python():
    assert len(COMMANDS) > 30 and len(blocks("python")) >= 4


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv)[:60])
def test_every_command_line_parses(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"deepseek-tf {' '.join(argv)}: argparse refused it (exit {e.code})")


@pytest.mark.parametrize("argv", RUN_FOR_REAL, ids=" ".join)
def test_the_cheap_commands_run(argv, capsys):
    assert argv in COMMANDS
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ("shakespeare-char" in out) if argv[1] == "--presets" else ("671.0B total" in out)


def test_the_training_commands_configs_resolve():
    """Each `train` / `federated` command's preset and `--set` values make a valid config
    (a key, a type or a combination refused would show here, without training)."""
    from deepseek_tf.config.loader import load_config

    checked = 0
    for argv in COMMANDS:
        if argv[0] in ("train", "federated") and "--resume" not in argv:
            args = build_parser().parse_args(argv)
            if args.init_from is None if argv[0] == "train" else True:
                load_config(preset=args.preset, path=args.config, overrides=args.overrides)
                checked += 1
    assert checked >= 8


def test_the_federated_commands_prepare(tmp_path, capsys):
    """Each `federated` command, with `--prepare-only` and its `--out` moved to a scratch
    directory, resolves its flags and splits the corpus into its clients (the README's
    Flower command once asked 8 clients a round of 4). The engine is left out: Flower is
    an optional extra, and the clients are the same for both engines."""
    federated = [argv for argv in COMMANDS if argv[0] == "federated"]
    assert len(federated) >= 3
    for i, argv in enumerate(federated):
        argv = [str(tmp_path / f"fed{i}") if a.startswith(("runs/", "/srv/")) else a for a in argv]
        if "--engine" in argv:
            del argv[argv.index("--engine") : argv.index("--engine") + 2]
        flags = [] if "--prepare-only" in argv else ["--prepare-only"]
        assert main([*argv, *flags]) == 0, (argv, capsys.readouterr().err)
        assert f"prepared {tmp_path / f'fed{i}'}" in capsys.readouterr().out


VERBS = ("train", "federated", "prepare_data", "train_tokenizer", "info", "load", "evaluate",
         "calibrate", "generate", "export", "serve", "convert_from_hf", "convert_to_hf",
         "compress.quantize")  # fmt: skip


def test_the_python_examples_show_every_verb():
    code = "\n".join(blocks("python"))
    assert not [verb for verb in VERBS if f"ds.{verb}(" not in code]


def test_the_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block, in order, in one namespace, in an empty directory (as a
    reader pastes them): train, info, load, evaluate, generate, calibrate, compress,
    export, serve, convert_to_hf / convert_from_hf, train_tokenizer, prepare_data and
    federated, with the README's own small settings."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "runs" / "moe-back" / "config.yaml").is_file()
    assert (tmp_path / "hf" / "moe" / "config.json").is_file()
    assert (tmp_path / "exports" / "char" / "saved_model.pb").is_file()
    assert namespace["fed"]["rounds"] == 2
