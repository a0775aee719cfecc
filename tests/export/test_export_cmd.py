"""`deepseek-tf export`: the command and its one-line errors."""

from deepseek_tf.cli.main import main


def test_export_savedmodel_command(export_run, tmp_path, capsys):
    out = tmp_path / "sm"
    assert main(["export", str(export_run), "--format", "savedmodel", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max_abs_logit_diff" in printed and (out / "saved_model.pb").exists()


def test_int8_only_for_litert(export_run, tmp_path, capsys):
    argv = ["export", str(export_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main([*argv, "--int8"]) == 2
    assert "only for --format litert" in capsys.readouterr().err
