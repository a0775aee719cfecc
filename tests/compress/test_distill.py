"""`compress distill`: a student trained on the teacher's softened distribution."""

import json

import numpy as np
import pytest

from deepseek_tf.errors import CompressionError

STUDENT = ["model.d_model=16"]  # the tiny preset at half width


def _teacher(trained_run, loaded):
    from deepseek_tf.rundir import RunDir

    model, tokenizer = loaded
    return RunDir(trained_run).read_config(), model, tokenizer


def _kl(teacher, student, config, tokenizer, batches=4):
    """Mean KL(teacher || student) at temperature 1 over validation batches."""
    from deepseek_tf.data.pipeline import make_eval_dataset
    from deepseek_tf.training.losses import distillation_term

    ds = make_eval_dataset(config.data, tokenizer, 4).take(batches)
    values = [
        float(distillation_term(teacher(x), student(x), w, 1.0))  # x: (B, T)
        for x, _, w in ds
    ]
    return float(np.mean(values))


def test_student_moves_toward_teacher(trained_run, loaded):
    from deepseek_tf.compress.distillation import distill_model, student_config_for
    from deepseek_tf.models.builder import build_model

    config, teacher, tokenizer = _teacher(trained_run, loaded)
    student_config = student_config_for(config, preset="tiny", overrides=STUDENT)
    assert student_config.data == config.data
    assert student_config.model.vocab_size == teacher.vocab_size
    assert student_config.model.d_model == 16

    def train(alpha):
        kw = {"alpha": alpha, "temperature": 1.0, "steps": 20, "log": None}
        return distill_model(teacher, config, tokenizer, student_config, **kw)

    untrained = build_model(student_config, seed=student_config.train.seed)
    initial = _kl(teacher, untrained, config, tokenizer)
    distilled = _kl(teacher, train(1.0), config, tokenizer)
    hard_only = _kl(teacher, train(0.0), config, tokenizer)
    assert distilled < 0.3 * initial
    assert distilled < 0.7 * hard_only, (distilled, hard_only)


def test_cli_writes_loadable_run(trained_run, tmp_path, capsys):
    from deepseek_tf.cli.main import main
    from deepseek_tf.rundir import RunDir, load_run

    out = tmp_path / "student"
    argv = ["compress", "distill", str(trained_run), "--out", str(out), "--quiet"]
    argv += ["--student-preset", "tiny", "--set", STUDENT[0], "--steps", "3", "--alpha", "0.7"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["method"] == "distill"
    assert record["options"]["alpha"] == 0.7 and record["options"]["steps"] == 3
    assert record["parameters_after"] < record["parameters_before"]  # before: the teacher
    assert np.isfinite(record["val_loss_after"]) and np.isfinite(record["val_loss_before"])
    history = json.loads((out / "compression.json").read_text())
    assert history[-1]["method"] == "distill"
    teacher_config, config = RunDir(trained_run).read_config(), RunDir(out).read_config()
    assert config.model.d_model == 16 and config.data == teacher_config.data
    model, tokenizer = load_run(out)
    ids = np.asarray([tokenizer.encode("To be")], "int32")  # (1, T)
    assert model(ids).shape == (1, ids.shape[1], teacher_config.model.vocab_size)


def test_tokenizer_mismatch_is_refused(trained_run, tmp_path, capsys):
    from deepseek_tf.cli.main import main

    out = tmp_path / "student"
    argv = ["compress", "distill", str(trained_run), "--out", str(out)]
    argv += ["--student-preset", "tiny", "--set", "data.tokenizer=bpe"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "data.tokenizer" in err and "'bpe'" in err, err
    assert not out.exists()


def test_student_config_file_checks(trained_run, tmp_path):
    from deepseek_tf.compress.distillation import check_options, student_config_for
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.rundir import RunDir

    teacher = RunDir(trained_run).read_config()
    path = tmp_path / "student.yaml"
    path.write_text("preset: tiny\nmodel: {d_model: 16}\ndata: {tokenizer: char, seq_len: 8}\n")
    student = student_config_for(teacher, path=path, steps=7)
    assert student.data.seq_len == teacher.data.seq_len and student.train.steps == 7
    path.write_text("preset: tiny\nmodel: {max_seq_len: 8}\ndata: {seq_len: 8}\n")
    with pytest.raises(CompressionError, match="max_seq_len=8"):
        student_config_for(teacher, path=path)
    with pytest.raises(CompressionError, match="model.vocab_size=7"):
        student_config_for(teacher, preset="tiny", overrides=["model.vocab_size=7"])
    with pytest.raises(CompressionError, match="--alpha"):
        check_options(1.5, 2.0, 0)
    # a Config object (the Python API): its data section is replaced like a preset's
    given = load_config("tiny", overrides=["model.d_model=16", "data.seq_len=8"])
    student = student_config_for(teacher, path=given, overrides=["train.steps=5"])
    assert student.model.d_model == 16 and student.train.steps == 5
    assert student.data == teacher.data
    with pytest.raises(CompressionError, match="--temperature"):
        check_options(0.5, 0.0, 0)
