"""The DeepSeek pieces inside the model: MLA + MoE + MTP end to end, and counts."""

import json

import numpy as np
import pytest

from deepseek_tf.api import load
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.generation.generate import Generator, generate_uncached
from deepseek_tf.models.builder import build_model, parameter_count


@pytest.fixture(scope="module")
def moe_config():
    return load_config("tiny-moe")


@pytest.mark.parametrize(
    "preset,total,activated",
    [
        ("deepseek-v3", 671e9, 37e9),
        ("deepseek-v2", 236e9, 21e9),
        ("deepseek-v2-lite", 15.7e9, 2.4e9),
    ],
)
def test_published_parameter_counts(preset, total, activated):
    counts = parameter_count(load_config(preset))
    assert counts["total"] == pytest.approx(total, rel=0.005)
    assert counts["activated"] == pytest.approx(activated, rel=0.025)
    if preset == "deepseek-v3":  # the MTP module: ~14B with its own embedding and head copies
        assert counts["mtp"] + 2 * counts["embedding"] == pytest.approx(14e9, rel=0.05)


@pytest.mark.parametrize(
    "overrides", [[], ["model.q_lora_rank=0", "model.mtp_depth=2", "model.n_shared_experts=0"]]
)
def test_counts_match_the_built_model(moe_config, overrides):
    config = apply_overrides(moe_config, overrides)
    model = build_model(config, vocab_size=29)
    counts = parameter_count(config, 29)
    built = sum(int(np.prod(w.shape)) for w in model.weights)  # incl. the routing biases
    assert counts["total_with_mtp"] == built
    assert counts["activated"] < counts["total"]


@pytest.mark.parametrize("absorb", [True, False])
def test_cached_decoding_matches_full_forward(moe_config, absorb):
    config = apply_overrides(
        moe_config, [f"model.mla_absorb={str(absorb).lower()}", "model.init_std=0.3"]
    )
    model = build_model(config, vocab_size=29, seed=1)
    ids = np.random.RandomState(0).randint(0, 29, (2, 12)).astype("int32")
    full = np.asarray(model(ids))
    cache = model.init_cache(2, 16)
    logits, cache = model.call_with_cache(ids[:, :5], cache, 0)
    pieces = [np.asarray(logits)]
    for i in range(5, 12):
        logits, cache = model.call_with_cache(ids[:, i : i + 1], cache, i)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-4, rtol=1e-4)
    prompt = ids[0, :4].tolist()
    assert Generator(model).generate([prompt], 10) == [generate_uncached(model, prompt, 10)]


def test_moe_mtp_training_moves_biases_and_logs_balance(shared_run):
    run = shared_run("tiny-moe")  # trained as `moe_config` says
    entries = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "loss" in e]
    assert all(np.isfinite(e["mtp_loss"]) and e["aux_loss"] > 0 for e in steps)
    assert all(e["load_max_mean"] >= 1.0 and e["load_min_mean"] <= 1.0 for e in steps)
    loads = np.array(steps[-1]["expert_load"])  # (moe layers + MTP, experts)
    assert loads.shape == (3, 8)
    np.testing.assert_allclose(loads.sum(axis=1), 1.0, atol=1e-3)
    model, _ = load(run)
    biases = [m.gate.e_score_correction_bias.numpy() for m in model.moe_modules()]
    assert len(biases) == 3 and all(np.abs(b).max() > 0 for b in biases)  # restored, moved
    for b in biases:  # every update is +-gamma per expert and step
        np.testing.assert_allclose(np.round(b / 0.01), b / 0.01, atol=1e-3)


def test_remat_blocks_gives_the_same_gradients(moe_config):
    import tensorflow as tf

    ids = np.random.RandomState(0).randint(0, 29, (2, 16)).astype("int32")
    results = []
    for remat in ("none", "blocks"):
        model = build_model(apply_overrides(moe_config, [f"model.remat={remat}"]), 29, seed=0)
        with tf.GradientTape() as tape:
            logits, stats = model.forward_with_stats(ids, training=True)
            loss = tf.reduce_mean(logits**2) + stats["aux_loss"]
            loss += sum(tf.reduce_mean(lg**2) for lg in stats["mtp_logits"])
        grads = tape.gradient(loss, model.trainable_variables)
        results.append([tf.convert_to_tensor(g).numpy() for g in grads])
    for plain, remat in zip(*results):
        np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-7)
