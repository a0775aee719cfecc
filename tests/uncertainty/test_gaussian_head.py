"""The brief's probabilistic head: its KL, its ELBO training, and a gaussian run that saves,
resumes, exports and serves like any other."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.api import load, train
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.layers.gaussian_head import GaussianHead

GAUSSIAN = [
    "model.head=gaussian",
    "model.head_samples=2",
    "train.eval_every=0",
    "train.log_every=1",
]


def test_kl_is_the_closed_form():
    rng = np.random.default_rng(0)
    loc = rng.normal(size=(3, 5, 6)).astype(np.float32)
    log_var = rng.normal(size=(3, 5, 6)).astype(np.float32)
    kl = np.asarray(GaussianHead(6).kl_to_prior(loc, log_var))
    closed = 0.5 * (np.exp(log_var) + loc**2 - 1.0 - log_var).sum(-1)
    np.testing.assert_allclose(kl, closed, rtol=1e-5)


def test_samples_are_reparameterised_and_seeded():
    head = GaussianHead(4)
    loc, log_var = head(tf.ones((2, 3, 4)))
    seed = tf.constant([1, 2], tf.int32)
    a, b = head.sample(loc, log_var, 5, seed), head.sample(loc, log_var, 5, seed)
    np.testing.assert_array_equal(a, b)
    x = tf.ones((2, 3, 4))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(head.sample(*head(x), 3, seed))
    grads = tape.gradient(total, head.trainable_variables)  # pathwise: through the samples
    assert all(g is not None for g in grads)


@pytest.mark.parametrize(
    "override,key", [("model.head_samples=0", "model.head_samples"),
                     ("model.head_kl_weight=-1", "model.head_kl_weight"),
                     ("model.head=bayes", "model.head")],
)  # fmt: skip
def test_bad_head_settings(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("tiny", overrides=["model.head=gaussian", override])


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    config = apply_overrides(load_config("tiny"), [*GAUSSIAN, "train.steps=30"])
    run = tmp_path_factory.mktemp("gauss") / "run"
    train(config, out=run, sample_tokens=0, verbose=0)
    return config, run


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_elbo_training_learns_and_resumes(gaussian_run):
    config, run = gaussian_run
    steps = [e for e in _metrics(run) if "loss" in e]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
    assert all(e["head_kl"] > 0 for e in steps)  # the KL term is part of the objective
    train(apply_overrides(config, ["train.steps=34"]), out=run, resume=True, sample_tokens=0,
          verbose=0)  # fmt: skip
    assert [e["step"] for e in _metrics(run) if "loss" in e] == list(range(1, 35))
    model, tokenizer = load(run)
    assert model.gaussian_head is not None and model.head_samples == 2


def test_gaussian_run_exports_and_serves(gaussian_run, tmp_path):
    from serving_helpers import request, start_server

    from deepseek_tf.export.savedmodel import export_savedmodel

    _, run = gaussian_run
    model, tokenizer = load(run)
    report = export_savedmodel(model, tmp_path / "sm", tokenizer)
    assert report["max_abs_logit_diff"] < 1e-4
    srv, app, url = start_server(model, tokenizer)
    try:
        status, body = request(
            url, "POST", "/v1/completions", {"prompt": "Th", "max_tokens": 4, "logprobs": 1}
        )
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()
    assert status == 200 and len(body["choices"][0]["logprobs"]["token_entropies"]) == 4
