"""`deepseek-tf export`: the command and its one-line errors."""

import importlib.util

import pytest

from deepseek_tf.api.deployment import export
from deepseek_tf.cli.main import build_parser, main
from deepseek_tf.errors import InputError


def test_export_savedmodel_command(export_run, tmp_path, capsys):
    out = tmp_path / "sm"
    assert main(["export", str(export_run), "--format", "savedmodel", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max_abs_logit_diff" in printed and (out / "saved_model.pb").exists()


def test_no_verify_is_verify_false():
    argv = ["export", "run", "--format", "onnx", "--out", "m.onnx"]
    assert build_parser().parse_args(argv).verify is True
    assert build_parser().parse_args([*argv, "--no-verify"]).verify is False


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"format": "onnx", "int8": True}, "only for --format litert"),
        ({"format": "savedmodel", "prefill_len": 8}, "--prefill-len is only for --format litert"),
        ({"format": "tflite"}, "unknown export format 'tflite'"),
    ],
)
def test_export_checks_its_options_before_loading(tmp_path, options, match):
    with pytest.raises(InputError, match=match):  # no run at all: nothing is read first
        export(tmp_path / "nowhere", out=tmp_path / "out", **options)


def test_int8_only_for_litert(export_run, tmp_path, capsys):
    argv = ["export", str(export_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main([*argv, "--int8"]) == 2
    assert "only for --format litert" in capsys.readouterr().err


def test_existing_out_is_refused_unless_overwrite(export_run, tmp_path, capsys):
    out = tmp_path / "m.tflite"
    out.write_bytes(b"earlier work")
    argv = ["export", str(export_run), "--format", "litert", "--out", str(out)]
    assert main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier work"


@pytest.mark.skipif(
    importlib.util.find_spec("ai_edge_litert") is not None, reason="the interpreter is installed"
)
def test_litert_export_that_cannot_be_checked_fails(export_run, tmp_path, capsys):
    out = tmp_path / "m.tflite"
    argv = ["export", str(export_run), "--format", "litert", "--out", str(out)]
    assert main(argv) == 2
    assert "cannot verify the LiteRT file" in capsys.readouterr().err and not out.exists()
