import numpy as np
import pytest

from deepseek_tf.layers.rotary import RotaryEmbedding, rope_inv_freq, yarn_get_mscale


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
