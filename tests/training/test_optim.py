"""`train.optimizer` (Keras' AdamW, Lion, Muon) and `train.time_limit_minutes`."""

import json

import keras
import numpy as np
import pytest

from deepseek_tf.api import train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.optim import make_optimizer


def _config(*overrides):
    return apply_overrides(load_config("tiny"), list(overrides))


def _model_config(*overrides):
    return _config("model.vocab_size=32", *overrides)


@pytest.mark.parametrize(("name", "cls"), [("adamw", "AdamW"), ("lion", "Lion"), ("muon", "Muon")])
def test_the_named_optimizer_is_built(name, cls):
    config = _model_config(f"train.optimizer={name}")
    model = build_model(config)
    optimizer = make_optimizer(config.train, model)
    assert type(optimizer).__name__ == cls
    assert optimizer.built


def test_muon_orthogonalises_matrices_and_leaves_the_rest_to_adamw():
    config = _model_config("train.optimizer=muon")
    model = build_model(config)
    optimizer = make_optimizer(config.train, model)
    by_path = {v.path: v for v in model.trainable_variables}
    adamw = {p for p, v in by_path.items() if optimizer._should_use_adamw(v)}
    muon = set(by_path) - adamw
    assert muon and all(len(by_path[p].shape) == 2 for p in muon)
    assert all("embedding" not in p and "table" not in p for p in muon)  # AdamW for those
    assert any(len(by_path[p].shape) == 1 for p in adamw)  # norm scales: AdamW


def test_muon_and_lion_train_a_tiny_run(tmp_path):
    for name in ("muon", "lion"):
        run = tmp_path / name
        config = _config(f"train.optimizer={name}", "train.steps=30", "train.eval_every=0",
                         "train.log_every=5", "train.learning_rate=3e-3")  # fmt: skip
        train(config, run, verbose=0)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [e["loss"] for e in lines if "loss" in e and "step" in e]
        assert np.isfinite(losses).all()
        assert np.mean(losses[-2:]) < losses[0] - 0.2, (name, losses)


def test_an_unknown_optimizer_is_a_one_line_error():
    with pytest.raises(ConfigError, match="train.optimizer"):
        _config("train.optimizer=sgd")
    with pytest.raises(ConfigError, match="train.time_limit_minutes"):
        _config("train.time_limit_minutes=-1")


def test_the_time_limit_stops_with_an_evaluation_and_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    # 0.002 min: the limit passes during the first (compiled) step
    config = _config("train.steps=1000", "train.time_limit_minutes=0.002",
                     "train.eval_every=500", "train.checkpoint_every=500")  # fmt: skip
    summary = train(config, run, verbose=0)
    assert summary["step"] < 1000
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in lines if e.get("event") == "summary"][-1]
    assert final["stopped"] == "time_limit"
    vals = [e for e in lines if "val_loss" in e]
    assert vals and vals[-1]["step"] == summary["step"] and vals[-1]["time"] > 0
    assert (run / "checkpoints" / f"ckpt-{summary['step']}.index").exists()
    assert keras.config.dtype_policy().name == "float32"  # nothing leaked
