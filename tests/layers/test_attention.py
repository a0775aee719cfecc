import numpy as np
import pytest

from deepseek_tf.layers.attention import CausalSelfAttention
from deepseek_tf.layers.causal_conv import CausalConv1D
from deepseek_tf.layers.relative_position_bias import relative_buckets


@pytest.mark.parametrize("position", ["rope", "dynamic", "rope+dynamic"])
def test_attention_is_causal_and_cache_matches_full(position):
    attn = CausalSelfAttention(
        16, 4, 2, 4, position=position, bias_buckets=8, bias_max_distance=16, init_std=0.2
    )
    attn(np.zeros((1, 1, 16), "float32"))
    if attn.relative_bias is not None:  # make the bias matter
        attn.relative_bias.table.assign(np.random.RandomState(0).randn(8, 4))
    x = np.random.RandomState(1).randn(2, 7, 16).astype("float32")
    full = np.asarray(attn(x))
    changed = x.copy()
    changed[:, 5:] += 1.0
    np.testing.assert_allclose(np.asarray(attn(changed))[:, :5], full[:, :5], atol=1e-5)
    assert not np.allclose(np.asarray(attn(changed))[:, 5:], full[:, 5:])

    cache = attn.init_cache(2, 12)
    out, cache = attn(x[:, :4], cache=cache, cache_index=0)
    steps = [np.asarray(out)]
    for i in range(4, 7):
        out, cache = attn(x[:, i : i + 1], cache=cache, cache_index=i)
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = CausalSelfAttention(16, 4, 2, 4, init_std=0.2)
    mha = CausalSelfAttention(16, 4, 4, 4, init_std=0.2)
    x = np.random.RandomState(2).randn(1, 5, 16).astype("float32")
    gqa(x), mha(x)
    wq, wk, wv, wo = [
        w.numpy()
        for w in (gqa.q_proj.kernel, gqa.k_proj.kernel, gqa.v_proj.kernel, gqa.o_proj.kernel)
    ]
    repeat = lambda w: np.repeat(w.reshape(16, 2, 4), 2, axis=1).reshape(16, 16)  # noqa: E731
    mha.q_proj.kernel.assign(wq)
    mha.k_proj.kernel.assign(repeat(wk))
    mha.v_proj.kernel.assign(repeat(wv))
    mha.o_proj.kernel.assign(wo)
    np.testing.assert_allclose(np.asarray(mha(x)), np.asarray(gqa(x)), atol=1e-5)


def test_relative_buckets_are_monotonic_and_bounded():
    distance = np.arange(0, 300, dtype="int32")
    buckets = np.asarray(relative_buckets(distance, 16, 128))
    assert buckets[0] == 0 and buckets[7] == 7  # exact half
    assert np.all(np.diff(buckets) >= 0)
    assert buckets.max() == 15 and buckets[200] == 15


def test_causal_conv_sees_no_future_and_state_matches_full():
    conv = CausalConv1D(6, kernel_size=3, init_std=0.3)
    x = np.random.RandomState(3).randn(2, 8, 6).astype("float32")
    full = np.asarray(conv(x))
    changed = x.copy()
    changed[:, 4:] = 0.0
    np.testing.assert_allclose(np.asarray(conv(changed))[:, :4], full[:, :4], atol=1e-6)
    state = conv.init_state(2)
    outs = []
    for i in range(8):
        out, state = conv(x[:, i : i + 1], state=state)
        outs.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)
