"""The compression library: typed functions the CLI maps onto, and the one job skeleton."""

import argparse
import importlib
import inspect
import json

import numpy as np
import pytest

from deepseek_tf import compress
from deepseek_tf.cli.main import build_parser
from deepseek_tf.compress.job import Plan, Result, run_job
from deepseek_tf.config.loader import update_config
from deepseek_tf.errors import CompressionError
from deepseek_tf.rundir import RunDir, load_run


def _method_parsers():
    """`{method: subparser}` of `deepseek-tf compress`."""
    root = build_parser()
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    methods = commands.choices["compress"]
    sub = next(a for a in methods._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_every_flag_is_a_keyword_of_its_function_with_the_same_default():
    parsers = _method_parsers()
    assert sorted(parsers) == ["distill", "lowrank", "prune", "qat", "quantize"]
    for name, parser in parsers.items():
        module, _, attr = parser.get_default("api").partition(":")
        function = getattr(importlib.import_module(module), attr)
        assert function is getattr(compress, name)
        params = inspect.signature(function).parameters
        dests = [a for a in parser._actions if a.dest != "help"]
        assert dests
        for action in dests:
            assert action.dest in params, f"compress {name}: {action.dest}"
            default = params[action.dest].default
            if default is not inspect.Parameter.empty and not action.required:
                assert _as_list(default) == _as_list(action.default), (name, action.dest)
        positional = [p for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [p.name for p in positional] == ["run_dir"], name  # the rest keyword-only


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("quantize", {"mode": "int3"}, "--mode"),
        ("quantize", {"mode": "int4", "bits": "4"}, "--bits"),
        ("qat", {"steps": 0}, "--steps"),
        ("prune", {"importance": "random"}, "--importance"),
        ("prune", {"sparsity": "0.3"}, "--sparsity"),
        ("distill", {}, "--student-preset"),
        ("distill", {"student_preset": "tiny", "student_config": "s.yaml"}, "--student-preset"),
        ("distill", {"student_preset": "tiny", "alpha": 2.0}, "--alpha"),
        ("lowrank", {"rank": 4, "energy": 0.5}, "--energy"),
        ("lowrank", {"targets": ("ffn", "conv")}, "--targets"),
    ],
)
def test_bad_options_are_refused_before_the_run_is_read(tmp_path, method, options, message):
    # the source does not exist: reaching it would be a RunDirError, not this refusal
    out = tmp_path / "out"
    with pytest.raises(CompressionError, match=message) as raised:
        getattr(compress, method)(tmp_path / "no-such-run", out=out, **options)
    assert "\n" not in str(raised.value)
    assert not out.exists()


def test_quantize_from_python_writes_the_run_and_returns_its_record(trained_run, tmp_path, capsys):
    out = tmp_path / "ffn-int8"
    record = compress.quantize(trained_run, out=out, mode="int8", include=("ffn",))
    captured = capsys.readouterr()
    assert captured.out == ""  # progress goes to stderr, the record to the caller
    assert "[quantize] int8 on ffn" in captured.err
    assert record["method"] == "quantize" and record["options"]["include"] == ["ffn"]
    assert record["options"]["group_size"] == -1  # int8 default: one scale per channel
    assert record["bytes_after"] < record["bytes_before"]
    assert abs(record["val_loss_after"] - record["val_loss_before"]) < 0.05
    assert record["seconds"] >= 0 and record["parameters_before"] > 0
    entry = json.loads((out / "compression.json").read_text())[-1]
    assert entry["source"] == str(trained_run) and {k: entry[k] for k in record} == record
    model, _ = load_run(out)
    assert model.blocks[0].ffn.up_proj.quantization_mode == "int8"
    assert model.blocks[0].attention.q_proj.quantization_mode is None
    assert RunDir(out).read_config().compression.quantize_include == ("ffn",)


def test_the_job_measures_transforms_records_and_writes_once(trained_run, tmp_path):
    calls = []

    def transform(source, log):
        calls.append("transform")
        log("[test] silent under quiet")
        config = update_config(source.config, calibration={"logit_temperature": 2.0})
        return Result(config, source.model, {"note": 1})

    def plan_for(config):
        calls.append("plan")
        return Plan("test", {"k": 1}, transform, check_loaded=lambda s: calls.append("loaded"))

    out = tmp_path / "same"
    record = run_job(trained_run, out, plan_for, quiet=True)
    assert calls == ["plan", "loaded", "transform"]
    assert record["method"] == "test" and record["options"] == {"k": 1} and record["note"] == 1
    assert record["parameters_after"] == record["parameters_before"]
    assert record["bytes_after"] == record["bytes_before"]
    assert np.isclose(record["val_loss_after"], record["val_loss_before"], rtol=1e-3)
    assert RunDir(out).read_config().calibration.logit_temperature == 2.0
    assert RunDir(out).read_history()[-1]["note"] == 1

    def refuse(source):
        raise CompressionError("no")

    never = tmp_path / "never"
    with pytest.raises(CompressionError):
        run_job(trained_run, never, lambda c: Plan("test", {}, transform, refuse), quiet=True)
    assert calls.count("transform") == 1 and not (never / "config.yaml").exists()
    with pytest.raises(Exception, match="source run"):
        run_job(trained_run, trained_run, plan_for, quiet=True)
