"""The `deepseek-tf` commands, run in-process (and once as the installed script)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_tf.cli.main import main
from deepseek_tf.rundir import RunDir
from deepseek_tf.tokenizers import load_tokenizer


def run_cli(capsys, *args):
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_eval_info_on_a_trained_run(trained_run, capsys):
    code, out, _ = run_cli(
        capsys,
        "generate",
        trained_run,
        "--prompt",
        "ROMEO:",
        "--prompt",
        "JULIET:",
        "--max-new-tokens",
        "20",
        "--seed",
        "1",
    )
    assert code == 0 and "ROMEO:" in out and "JULIET:" in out
    code, out, _ = run_cli(capsys, "eval", trained_run, "--max-batches", "3")
    result = json.loads(out)
    assert code == 0 and {"loss", "perplexity", "accuracy", "tokens"} <= set(result)
    assert result["tokens"] > 0 and 0 <= result["accuracy"] <= 1
    code, out, _ = run_cli(capsys, "info", trained_run)
    assert code == 0 and '"total": 23840' in out and "d_model: 32" in out


def test_eval_on_a_file(trained_run, tmp_path, capsys):
    """`--data` is what is evaluated: its token count follows the file (whole 16-token
    blocks of it), never the validation split."""
    counts = {}
    for lines in (20, 40):
        text = tmp_path / f"t{lines}.txt"
        text.write_text("To be, or not to be, that is the question.\n" * lines)
        code, out, _ = run_cli(capsys, "eval", trained_run, "--data", text)
        assert code == 0
        counts[lines] = json.loads(out)["tokens"]
    for lines, tokens in counts.items():  # 44 characters a line, one token each
        assert 0.9 * 44 * lines <= tokens <= 44 * lines and tokens % 16 == 0, counts


def test_train_on_files_given_with_data(tmp_path, capsys):
    """`train --data FILE` trains on that file: its characters (none of them in the
    bundled corpus) are in the run's vocabulary."""
    text = tmp_path / "greek.txt"
    text.write_text("\u03b1\u03b2\u03b3 \u00e9t\u00e9 \u00df\u00f8\n" * 400, encoding="utf-8")
    out = tmp_path / "run"
    code, printed, err = run_cli(
        capsys, "train", "--preset", "tiny", "--data", text, "--out", out, "--sample-tokens", "0",
        "--set", "train.steps=2", "--set", "train.eval_every=0",
    )  # fmt: skip
    assert code == 0, err
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == len(set(text.read_text(encoding="utf-8")))
    assert len(tokenizer.encode("\u03b1\u03b2\u00df")) == 3  # unknown characters would raise
    assert RunDir(out).read_config().data.files == (str(text),)
    assert '"Once upon a time"' in printed  # the next steps suit a corpus of one's own


def _one_line_error(capsys, *args, match):
    code, out, err = run_cli(capsys, *args)
    assert code == 2, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


def test_bad_input_gives_one_line_errors(trained_run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    out = tmp_path / "run"
    train = ("train", "--preset", "tiny", "--out", out)
    _one_line_error(capsys, *train, "--set", "model.n_layrs=3", match="model.n_layrs")
    _one_line_error(
        capsys, *train, "--set", f"data.files=[{tmp_path}/none*.txt]", match="no file matches"
    )
    _one_line_error(capsys, *train, "--set", f"data.files=[{empty}]", match="empty.txt")
    _one_line_error(capsys, *train, "--set", f"data.files=[{latin}]", match="UTF-8")
    _one_line_error(capsys, *train, "--set", "data.seq_len=64", match="model.max_seq_len=48")
    _one_line_error(
        capsys,
        "generate",
        trained_run,
        "--prompt",
        "x" * 60,
        match="more than the model's context of 48",
    )
    _one_line_error(capsys, "generate", trained_run, "--prompt", "caf\u00e9", match="'\u00e9'")
    _one_line_error(capsys, "generate", tmp_path, "--prompt", "a", match="config.yaml")


def test_installed_console_script(tmp_path):
    beside = Path(sys.executable).parent / "deepseek-tf"
    exe = str(beside) if beside.exists() else shutil.which("deepseek-tf")
    if exe is None:
        pytest.skip("package not installed (pip install -e .)")
    done = subprocess.run(
        [exe, "info", "--preset", "tiny"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    counts = next(line for line in done.stdout.splitlines() if line.startswith('{"parameters"'))
    assert json.loads(counts)["parameters"]["total"] == 23840
