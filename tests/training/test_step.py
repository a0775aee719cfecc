"""The training step: accumulation, explicit clipping, the monitor's signals."""

import keras
import numpy as np
import pytest

from deepseek_tf.models.builder import build_model
from deepseek_tf.training.monitor import TrainingMonitor
from deepseek_tf.training.optim import make_optimizer
from deepseek_tf.training.step import make_train_step


def _run_step(config, accumulation, inputs, targets, weights):
    model = build_model(config, vocab_size=17, seed=7)
    optimizer = make_optimizer(config.train, model)
    step = make_train_step(
        model,
        optimizer,
        accumulation=accumulation,
        replicas=1,
        sparsity_threshold=0.01,
        jit_compile=False,
    )
    out = step(inputs, targets, weights)
    return out, [v.numpy() for v in model.trainable_variables]


def test_accumulating_4_micro_batches_equals_one_4x_batch(tiny_config):
    from deepseek_tf.config.loader import apply_overrides

    tiny_config = apply_overrides(tiny_config, ["train.warmup_steps=0"])
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 17, (8, 17)).astype("int32")
    inputs, targets = ids[:, :-1], ids[:, 1:]
    weights = np.ones_like(inputs, dtype="float32")
    big, big_vars = _run_step(tiny_config, 1, inputs, targets, weights)
    micro = [a.reshape(4, 2, 16) for a in (inputs, targets, weights)]  # (A, B, T)
    acc, acc_vars = _run_step(tiny_config, 4, *micro)
    assert float(acc["loss"]) == pytest.approx(float(big["loss"]), rel=1e-5)
    assert float(acc["grad_norm"]) == pytest.approx(float(big["grad_norm"]), rel=1e-4)
    for a, b in zip(acc_vars, big_vars):
        # Adam normalises tiny gradients, amplifying float32 summation-order noise: 1e-5.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    init = build_model(tiny_config, vocab_size=17, seed=7).trainable_variables[0].numpy()
    assert not np.allclose(init, big_vars[0])  # the step did update


def _batch(batch=4, seq=16, vocab=17):
    ids = np.random.RandomState(1).randint(0, vocab, (batch, seq + 1)).astype("int32")
    return ids[:, :-1], ids[:, 1:], np.ones((batch, seq), "float32")  # (B, T) each


def test_two_steps_built_on_one_optimizer_both_clip(tiny_config):
    """`clip_norm` is the step's own argument: building a second step on the same optimizer
    clips as the first does (the norm used to travel through the optimizer's
    `global_clipnorm`, which the first step then set to None)."""
    model = build_model(tiny_config, vocab_size=17, seed=7)
    optimizer = keras.optimizers.SGD(learning_rate=1.0)  # the update is minus the gradient
    optimizer.build(model.trainable_variables)
    for _ in range(2):
        step = make_train_step(model, optimizer, clip_norm=1e-3, jit_compile=False)
        before = [v.numpy() for v in model.trainable_variables]
        out = step(*_batch())
        moved = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
        assert float(out["grad_norm"]) > 0.1  # the gradient's own norm, before clipping
        assert np.sqrt(sum(np.sum(np.square(m, dtype="float64")) for m in moved)) == (
            pytest.approx(1e-3, rel=1e-3)
        )


def test_an_optimizer_that_clips_itself_is_refused(tiny_config):
    model = build_model(tiny_config, vocab_size=17, seed=7)
    optimizer = keras.optimizers.SGD(learning_rate=1.0, global_clipnorm=1.0)
    with pytest.raises(ValueError, match="global_clipnorm=1.0; build it without clipping"):
        make_train_step(model, optimizer, clip_norm=1.0)


def test_monitor_signals():
    monitor = TrainingMonitor(window=3)
    monitor.on_train_begin()
    logs = {}
    for i, loss in enumerate([4.0, 3.0, 2.0, 1.0]):
        logs = {
            "loss": loss,
            "tokens": 1000,
            "grad_norm": 0.5,
            "activation_sparsity": 0.1,
            "step": i + 1,
        }
        monitor.on_train_batch_end(i, logs)
    assert logs["loss_variance"] == pytest.approx(np.var([3.0, 2.0, 1.0]))
    assert logs["tokens_per_sec"] > 0 and logs["memory_mb"] > 10
    assert monitor.history["grad_norm"] == [0.5] * 4
