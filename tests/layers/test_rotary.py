import math

import numpy as np
import pytest

from deepseek_tf.layers.attention import CausalSelfAttention
from deepseek_tf.layers.mla import MultiHeadLatentAttention
from deepseek_tf.layers.rotary import (
    RotaryEmbedding,
    RotarySettings,
    rope_inv_freq,
    yarn_get_mscale,
)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_scores_depend_only_on_relative_position(layout):
    rope = RotaryEmbedding(8, layout=layout)
    rng = np.random.RandomState(0)
    q = rng.randn(1, 1, 1, 8).astype("float32")
    k = rng.randn(1, 1, 1, 8).astype("float32")

    def score(qp, kp):
        qr = np.asarray(rope(q, np.array([qp], "int32")))
        kr = np.asarray(rope(k, np.array([kp], "int32")))
        return float((qr * kr).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
    # rotation preserves the norm
    rotated = np.asarray(rope(q, np.array([7], "int32")))
    assert np.linalg.norm(rotated) == pytest.approx(np.linalg.norm(q), rel=1e-5)


def test_interleaved_equals_half_after_permutation():
    x = np.random.RandomState(1).randn(1, 3, 2, 8).astype("float32")
    pos = np.arange(3, dtype="int32")
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # pairs -> halves
    inter = np.asarray(RotaryEmbedding(8, layout="interleaved")(x, pos))
    half = np.asarray(RotaryEmbedding(8, layout="half")(x[..., perm], pos))
    np.testing.assert_allclose(inter[..., perm], half, atol=1e-5)


def test_yarn_keeps_high_frequencies_and_scales_low_ones():
    base = rope_inv_freq(64, 10000.0)
    yarn = rope_inv_freq(64, 10000.0, scaling_factor=8.0, original_max_len=256)
    assert yarn[0] == pytest.approx(base[0])  # fastest dimension untouched
    assert yarn[-1] == pytest.approx(base[-1] / 8.0, rel=1e-5)  # slowest interpolated
    assert np.all(yarn <= base + 1e-12)
    assert yarn_get_mscale(1.0) == 1.0
    assert yarn_get_mscale(40.0, 1.0) == pytest.approx(0.1 * np.log(40.0) + 1.0)


YARN = {
    "rope_theta": 500.0,
    "rope_layout": "interleaved",
    "rope_scaling_factor": 8.0,
    "rope_original_max_len": 16,
    "yarn_beta_fast": 16.0,
    "yarn_beta_slow": 2.0,
    "yarn_mscale": 0.9,
    "yarn_mscale_all_dim": 0.8,
}


def test_attention_and_mla_take_one_rotary_setup():
    """Both attention layers build their RoPE/YaRN from `RotarySettings`, with the
    values the two copies of the set-up computed before (bit for bit)."""
    attn = CausalSelfAttention(16, 2, 2, 8, **YARN)
    mla = MultiHeadLatentAttention(16, 2, 0, 8, 4, 8, 4, **YARN)
    inv_freq = rope_inv_freq(8, 500.0, 8.0, 16, 16.0, 2.0)
    temperature = yarn_get_mscale(8.0, 0.8) ** 2
    assert attn.scale == 1.0 / math.sqrt(8) * temperature
    assert mla.scale == 12**-0.5 * temperature
    for layer in (attn, mla):
        assert layer.rope.attention_factor == yarn_get_mscale(8.0, 0.9) / yarn_get_mscale(8.0, 0.8)
        np.testing.assert_array_equal(layer.rope.inv_freq, inv_freq)
        assert layer.rope.layout == "interleaved" and layer.rope.name == "rope"
        assert {k: layer.get_config()[k] for k in YARN} == YARN
    plain = CausalSelfAttention(32, 1, 1, 32)  # without YaRN: the plain 1 / sqrt(d)
    assert plain.scale == 1.0 / math.sqrt(32) and plain.rope.attention_factor == 1.0
    assert RotarySettings().softmax_factor == 1.0
    assert RotarySettings(rope_scaling_factor=8.0).softmax_factor == 1.0  # no mscale_all_dim
