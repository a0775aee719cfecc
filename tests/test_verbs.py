"""The Python API's verbs give what the command line prints, with its options."""

import json
import urllib.request

import pytest

import deepseek_tf as ds
from deepseek_tf.cli.main import main
from deepseek_tf.errors import ConfigError, InputError
from deepseek_tf.rundir import RunDir


def test_evaluate_equals_the_eval_command(trained_run, capsys):
    assert main(["eval", str(trained_run), "--max-batches", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = ds.evaluate(trained_run, max_batches=2)
    assert result["loss"] == pytest.approx(printed["loss"], rel=1e-6)
    assert result["tokens"] == printed["tokens"]


def test_generate_equals_the_generate_command(trained_run, capsys):
    argv = ["generate", str(trained_run), "--prompt", "ab", "--max-new-tokens", "12"]
    assert main([*argv, "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    texts = ds.generate(trained_run, "ab", max_new_tokens=12, temperature=0.0)
    assert printed.endswith(texts[0] + "\n") and len(texts[0]) > 2
    two = ds.generate(trained_run, ["ab", "cd"], max_new_tokens=5, temperature=0.0)
    assert len(two) == 2 and two[0].startswith("ab") and two[1].startswith("cd")


def test_options_are_checked_like_the_command_line(trained_run):
    with pytest.raises(ConfigError, match="unknown option 'max_tokens'.*max_new_tokens"):
        ds.generate(trained_run, "ab", max_tokens=3)
    with pytest.raises(ConfigError, match="--mode: invalid choice: 'int3'"):
        ds.compress_run("quantize", trained_run, "out", mode="int3")
    with pytest.raises(ConfigError, match="required: --mode"):
        ds.compress_run("quantize", trained_run, "out")
    with pytest.raises(InputError, match="--top-p"):
        ds.generate(trained_run, "ab", top_p=2.0)
    with pytest.raises(ConfigError, match="unknown method 'shrink'"):
        ds.compress_run("shrink", trained_run, "out")
    with pytest.raises(ConfigError, match="exactly one of from_hf and to_hf"):
        ds.convert_checkpoint(out="x")


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_export_run_writes_a_verified_savedmodel(trained_run, tmp_path):
    report = ds.export_run(trained_run, tmp_path / "sm", format="savedmodel")
    assert (tmp_path / "sm" / "saved_model.pb").exists()
    assert {"serving_default", "generate"} <= set(report["signatures"])
    with pytest.raises(InputError, match="already exists"):
        ds.export_run(trained_run, tmp_path / "sm")


@pytest.mark.slow  # heavy: runs in .ci/run under -m slow
def test_compress_run_quantizes_into_a_new_run(trained_run, tmp_path):
    record = ds.compress_run("quantize", trained_run, tmp_path / "q", mode="int8", quiet=True)
    assert record["method"] == "quantize"
    assert RunDir(tmp_path / "q").read_config().model.quantize == "int8"
    assert ds.evaluate(tmp_path / "q", max_batches=1)["loss"] > 0


def test_serve_answers_on_loopback_and_closes(trained_run):
    with ds.serve(trained_run, port=0, no_warm_up=True) as served:
        assert served.url.startswith("http://127.0.0.1:")
        assert served.wait_ready(60)
        body = json.dumps({"prompt": "ab", "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"{served.url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        assert reply["usage"]["completion_tokens"] == 3
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{served.url}/health", timeout=5)
