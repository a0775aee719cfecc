"""MTPModule with a decoding cache: chunked cached calls give the uncached outputs, for an
attention and a hybrid (conv) block, MHA and MLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.layers.mtp import MTPModule
from deepseek_tf.models.builder import build_model

MHA = {"n_heads": 2, "n_kv_heads": 2, "head_dim": 8}


def _module(block_type, seed=0):
    keras.utils.set_random_seed(seed)
    config = {
        "block_type": block_type,
        "ffn_hidden_dim": 32,
        "attention_config": MHA,
        "init_std": 0.2,
        "output_init_std": 0.2,
    }
    module = MTPModule(16, config, init_std=0.2)
    module.build((None, None, 16))
    return module


@pytest.mark.parametrize("block_type", ["attention", "hybrid"])
def test_cached_chunks_equal_the_uncached_call(block_type):
    module = _module(block_type)
    rng = np.random.default_rng(0)
    hidden = tf.constant(rng.normal(size=(2, 7, 16)), tf.float32)
    ahead = tf.constant(rng.normal(size=(2, 7, 16)), tf.float32)
    full = module(hidden, ahead)["x"]
    cache = module.init_cache(batch_size=2, max_len=16)
    outs = []
    for start, stop in ((0, 3), (3, 4), (4, 7)):
        out = module(hidden[:, start:stop], ahead[:, start:stop], cache=cache, cache_index=start)
        cache = out["cache"]
        outs.append(out["x"])
        assert out["block_input"].shape == (2, stop - start, 16)
    np.testing.assert_allclose(tf.concat(outs, axis=1), full, atol=1e-5)
    assert ("conv" in cache) == (block_type == "hybrid")


def test_cache_entries_beyond_a_query_are_masked():
    """Speculative decoding leaves rejected positions' entries in the cache until they are
    overwritten: a query must not see them."""
    module = _module("attention", seed=1)
    rng = np.random.default_rng(1)
    hidden = tf.constant(rng.normal(size=(1, 4, 16)), tf.float32)
    ahead = tf.constant(rng.normal(size=(1, 4, 16)), tf.float32)
    cache = module.init_cache(batch_size=1, max_len=8)
    junk = module(hidden[:, ::-1], ahead[:, ::-1], cache=cache, cache_index=0)["cache"]
    clean = module(hidden[:, :2], ahead[:, :2], cache=cache, cache_index=0)
    dirty = module(hidden[:, :2], ahead[:, :2], cache=junk, cache_index=0)
    np.testing.assert_allclose(dirty["x"], clean["x"], atol=1e-6)


def test_call_with_cache_returns_the_state_mtp_depth_1_reads():
    config = apply_overrides(load_config("tiny-moe"), ["model.mtp_depth=1"])
    model = build_model(config, vocab_size=29, seed=0)
    ids = np.arange(1, 7, dtype=np.int32)[None]  # (1, 6)
    logits, _, extras = model.call_with_cache(
        ids, model.init_cache(1, 16), tf.constant(0), return_hidden=True
    )
    np.testing.assert_allclose(
        extras["hidden"], model.final_norm(model.hidden_states(ids)), atol=1e-5
    )
    np.testing.assert_allclose(logits, model(ids), atol=1e-5)
    assert len(extras["block_inputs"]) == model.n_layers
    plain = model.call_with_cache(ids, model.init_cache(1, 16), tf.constant(0))
    assert len(plain) == 2  # the default is unchanged
