"""Blocked (online-softmax) attention equals the plain path in values and gradients."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.layers.attention import causal_attention
from deepseek_tf.layers.blocked_attention import blocked_attention
from deepseek_tf.layers.relative_position_bias import relative_buckets

BUCKETS = (8, 16)  # (num_buckets, max_distance)


def _plain_bias(table, q_positions, k_positions):
    """`RelativePositionBias`'s whole `(H, T, S)` (per row `(B, H, T, S)`) bias."""
    ids = relative_buckets(q_positions[..., :, None] - k_positions[None, :], *BUCKETS)
    bias = tf.gather(table, ids)  # ([B,] T, S, H)
    return tf.transpose(bias, (0, 3, 1, 2) if len(ids.shape) == 3 else (2, 0, 1))


def _both(q, k, v, q_positions, k_positions, table, block_size):
    """`(outputs, gradients)` of the plain and the blocked path for one random cotangent."""
    cotangent = tf.random.stateless_normal((*q.shape[:3], v.shape[-1]), seed=(1, 2))
    results = []
    for blocked in (False, True):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v] + ([table] if table is not None else []))
            if blocked:
                out = blocked_attention(
                    q, k, v, q_positions, k_positions, 0.3, table, BUCKETS, block_size
                )
            else:
                bias = None if table is None else _plain_bias(table, q_positions, k_positions)
                out = causal_attention(q, k, v, q_positions, k_positions, 0.3, bias)
            loss = tf.reduce_sum(out * cotangent)
        sources = [q, k, v] + ([table] if table is not None else [])
        grads = tape.gradient(loss, sources)  # (a gather's gradient is IndexedSlices)
        results.append((out.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]))
    return results


@pytest.mark.parametrize(
    "heads, kv_heads, dv, t, block_size, dynamic",
    [
        (4, 4, 8, 13, 4, False),  # MHA, T not a multiple of the block
        (4, 2, 8, 13, 4, True),  # the bias with padded queries and keys
        (4, 2, 8, 16, 8, True),  # GQA with the dynamic-attention bias
        (2, 2, 6, 9, 16, True),  # one block larger than the sequence; Dv != D (MLA)
        (6, 3, 8, 20, 1, True),  # one key per block
    ],
)
def test_training_shapes_equal_the_plain_path(heads, kv_heads, dv, t, block_size, dynamic):
    rng = np.random.default_rng(t)
    q = tf.constant(rng.normal(size=(2, t, heads, 8)), tf.float32)
    k = tf.constant(rng.normal(size=(2, t, kv_heads, 8)), tf.float32)
    v = tf.constant(rng.normal(size=(2, t, kv_heads, dv)), tf.float32)
    table = tf.constant(rng.normal(size=(BUCKETS[0], heads)), tf.float32) if dynamic else None
    positions = tf.range(t)
    (plain, plain_grads), (blocked, blocked_grads) = _both(
        q, k, v, positions, positions, table, block_size
    )
    np.testing.assert_allclose(blocked, plain, rtol=1e-5, atol=1e-5)
    for want, got in zip(plain_grads, blocked_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_prefill_into_a_cache_with_per_row_positions():
    """Queries at per-row positions against a cache whose unwritten slots lie ahead."""
    rng = np.random.default_rng(0)
    q = tf.constant(rng.normal(size=(2, 3, 4, 8)), tf.float32)
    k = tf.constant(rng.normal(size=(2, 11, 2, 8)), tf.float32)
    v = tf.constant(rng.normal(size=(2, 11, 2, 8)), tf.float32)
    table = tf.constant(rng.normal(size=(BUCKETS[0], 4)), tf.float32)
    q_positions = tf.constant([[2, 3, 4], [6, 7, 8]])  # rows at different places
    (plain, plain_grads), (blocked, blocked_grads) = _both(
        q, k, v, q_positions, tf.range(11), table, 4
    )
    np.testing.assert_allclose(blocked, plain, rtol=1e-5, atol=1e-5)
    for want, got in zip(plain_grads, blocked_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "q_positions, k_positions",
    [
        (tf.range(4, 11), tf.range(13)),  # prefill at 4: tiles start 4 after their keys
        (tf.constant([0, 1, 2, 5, 6, 7, 9]), tf.range(13)),  # a gap in the queries
    ],
)
def test_shared_positions_with_the_bias_equal_the_plain_path(q_positions, k_positions):
    rng = np.random.default_rng(3)
    q = tf.constant(rng.normal(size=(2, 7, 4, 8)), tf.float32)
    k = tf.constant(rng.normal(size=(2, 13, 2, 8)), tf.float32)
    v = tf.constant(rng.normal(size=(2, 13, 2, 8)), tf.float32)
    table = tf.constant(rng.normal(size=(BUCKETS[0], 4)), tf.float32)
    (plain, plain_grads), (blocked, blocked_grads) = _both(
        q, k, v, q_positions, k_positions, table, 4
    )
    np.testing.assert_allclose(blocked, plain, rtol=1e-5, atol=1e-5)
    for want, got in zip(plain_grads, blocked_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_compiled_and_bfloat16():
    """Inside `tf.function` (XLA) with bfloat16 inputs and the bias: the plain path's
    values within bfloat16's resolution, in the inputs' dtype."""
    rng = np.random.default_rng(1)
    q, k, v = (tf.constant(rng.normal(size=(1, 24, 2, 8)), tf.bfloat16) for _ in range(3))
    table = tf.constant(rng.normal(size=(BUCKETS[0], 2)), tf.float32)
    positions = tf.range(24)
    blocked = tf.function(blocked_attention, jit_compile=True)
    out = blocked(q, k, v, positions, positions, 0.35, table, BUCKETS, block_size=8)
    bias = _plain_bias(table, positions, positions)
    plain = causal_attention(q, k, v, positions, positions, 0.35, bias)
    assert out.dtype == tf.bfloat16
    np.testing.assert_allclose(
        tf.cast(out, tf.float32).numpy(), tf.cast(plain, tf.float32).numpy(), atol=0.05
    )


def _model(preset, blocked: bool):
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.models.builder import build_model

    above = ["model.attention_blocked_above=1", "model.attention_block_size=4"] if blocked else []
    config = load_config(preset, overrides=["model.attention_blocked_above=0", *above])
    return build_model(config, vocab_size=29, seed=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])  # rope+dynamic MHA/GQA; MLA
def test_a_model_with_blocked_attention_trains_and_prefills_as_the_plain_one(preset, monkeypatch):
    import deepseek_tf.layers.attention as attention
    import deepseek_tf.layers.mla as mla

    calls = []  # the real function, counted: the blocked model must take this path

    def counted(*args, **kwargs):
        calls.append(args[0].shape[1])
        return blocked_attention(*args, **kwargs)

    for module in (attention, mla):
        monkeypatch.setattr(module, "blocked_attention", counted)
    ids = np.random.default_rng(0).integers(0, 29, (2, 14)).astype("int32")
    results = []
    for blocked in (False, True):
        calls.clear()
        model = _model(preset, blocked)
        with tf.GradientTape() as tape:
            logits = model(ids, training=False)
            loss = tf.reduce_mean(logits**2)
        grads = tape.gradient(loss, model.trainable_variables)
        cache = model.init_cache(2, 20)
        prefill, cache = model.call_with_cache(ids[:, :12], cache, 0)  # blocked when asked
        step, _ = model.call_with_cache(ids[:, 12:13], cache, 12)  # one query: plain
        used = [tf.convert_to_tensor(g) for g in grads if g is not None]  # (MTP's: unused)
        results.append([logits, prefill, step, *used])
        # blocked: every layer's forward and prefill (never the one-query decode step)
        assert sorted(set(calls)) == ([12, 14] if blocked else [])
    for plain, blocked in zip(*results):
        np.testing.assert_allclose(blocked.numpy(), plain.numpy(), rtol=1e-4, atol=1e-5)


def test_the_block_settings_are_validated():
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.errors import ConfigError

    with pytest.raises(ConfigError, match="model.attention_block_size"):
        load_config("tiny", overrides=["model.attention_block_size=0"])
    with pytest.raises(ConfigError, match="model.attention_blocked_above"):
        load_config("tiny", overrides=["model.attention_blocked_above=-1"])
