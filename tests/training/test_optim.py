"""`train.optimizer` (Keras' AdamW, Lion, Muon), which weights decay and which Muon takes,
the warm-up warning and `train.time_limit_minutes`."""

import json

import keras
import numpy as np
import pytest

from deepseek_tf.api import train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.optim import make_optimizer, no_decay_variables, warmup_warning


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
        train(config, out=run, verbose=0, sample_tokens=0)
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
    summary = train(config, out=run, verbose=0, sample_tokens=0)
    assert summary["step"] < 1000
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in lines if e.get("event") == "summary"][-1]
    assert final["stopped"] == "time_limit"
    vals = [e for e in lines if "val_loss" in e]
    assert vals and vals[-1]["step"] == summary["step"] and vals[-1]["time"] > 0
    assert (run / "checkpoints" / f"ckpt-{summary['step']}.index").exists()
    assert keras.config.dtype_policy().name == "float32"  # nothing leaked


def _decisions(model, optimizer) -> list[tuple[str, bool, bool]]:
    """(path, decayed, Muon) of each trainable variable, in model order."""
    return [(v.path, optimizer._use_weight_decay(v), not optimizer._should_use_adamw(v))
            for v in model.trainable_variables]  # fmt: skip


@pytest.mark.parametrize(("preset", "decayed", "muon"), [("shakespeare-char", 28, 28),
                                                         ("tiny-moe", 47, 36)])  # fmt: skip
def test_weight_decay_and_muon_follow_rank_and_the_models_declared_roles(preset, decayed, muon):
    config = apply_overrides(load_config(preset), ["model.vocab_size=32", "train.optimizer=muon"])
    model = build_model(config)
    decisions = _decisions(model, make_optimizer(config.train, model))
    roles = model.weight_roles()
    tables = {v.path for v in roles["tables"]}
    head = {v.path for v in roles["output_head"]}
    ranks = {v.path: len(v.shape) for v in model.trainable_variables}
    for path, decays, orthogonalised in decisions:
        assert decays == (ranks[path] >= 2 and path not in tables), path
        assert orthogonalised == (ranks[path] == 2 and path not in tables | head), path
    # the presets' decayed (and Muon's) variables are those of the name-matching rule before
    assert sum(d for _, d, _ in decisions) == decayed
    assert sum(m for _, _, m in decisions) == muon
    assert model.embedding.embeddings.path in tables
    assert (preset == "tiny-moe") == bool(head)  # tiny-moe's output head is untied


def test_renaming_variables_changes_neither_decay_nor_muon():
    """A scope whose name holds every word the old name rule matched ("embedding",
    "table", "lm_head", "scale", "bias") leaves every decision as it was."""
    config = _model_config("train.optimizer=muon")
    plain = build_model(config)
    with keras.name_scope("lm_head_embedding_table_scale_bias"):
        renamed = build_model(config)
    assert renamed.trainable_variables[1].path.startswith("lm_head_embedding_table")
    before = [d[1:] for d in _decisions(plain, make_optimizer(config.train, plain))]
    after = [d[1:] for d in _decisions(renamed, make_optimizer(config.train, renamed))]
    assert after == before
    # the rule reads ranks and the declared tables, never names
    table = keras.Variable(np.zeros((4, 2)), name="kernel")
    matrix = keras.Variable(np.zeros((4, 2)), name="embeddings_table_bias")
    scale = keras.Variable(np.zeros(4), name="kernel")
    excluded = no_decay_variables([table, matrix, scale], tables=[table])
    assert [v.name for v in excluded] == ["kernel", "kernel"] and excluded[0] is table


def test_a_warm_up_longer_than_half_the_run_is_named():
    short = _config("train.steps=100", "train.warmup_steps=100").train
    assert warmup_warning(short).startswith(
        "train.warmup_steps 100 is more than half of train.steps 100: the learning rate "
        "reaches its peak"
    )
    assert "never" in warmup_warning(_config("train.steps=50", "train.warmup_steps=100").train)
    assert warmup_warning(_config("train.steps=200", "train.warmup_steps=100").train) is None


def test_a_traced_step_computes_the_learning_rate_once_and_as_the_schedule_says():
    """AdamW reads its learning rate once per decayed variable: the traced update holds
    one cosine, and the rate it applies equals Keras' warm-up + cosine at every step."""
    import tensorflow as tf

    config = _model_config("train.warmup_steps=3", "train.steps=10")
    model = build_model(config)
    optimizer = make_optimizer(config.train, model)
    variables = model.trainable_variables
    grads = [tf.zeros_like(v) for v in variables]
    apply = tf.function(lambda g: optimizer.apply(g, variables), autograph=False)
    graph = apply.get_concrete_function(grads).graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    cosines = [n for n in nodes if n.op == "Cos"]  # the schedule's (in its warm-up cond)
    decayed = len(variables) - len(no_decay_variables(variables, model.weight_roles()["tables"]))
    assert decayed > 1 and len(cosines) == 1
    t = config.train
    want = keras.optimizers.schedules.CosineDecay(
        0.0, t.steps - t.warmup_steps, alpha=t.min_learning_rate / t.learning_rate,
        warmup_target=t.learning_rate, warmup_steps=t.warmup_steps,
    )  # fmt: skip
    traced = tf.function(lambda: optimizer.learning_rate)
    for step in range(10):
        optimizer.iterations.assign(step)
        np.testing.assert_allclose(float(traced()), float(want(step)), rtol=1e-6)
        np.testing.assert_allclose(float(optimizer.learning_rate), float(want(step)), rtol=1e-6)
