"""The server's arithmetic: weighted averages, masks that cancel, DP noise and accounting."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from deepseek_tf.errors import ConfigError, TrainingError
from deepseek_tf.federated.privacy import DPConfig, check_dp, clip_update, epsilon
from deepseek_tf.federated.rounds import aggregate, sample_clients, secure_sum
from deepseek_tf.federated.secure_aggregation import (
    MaskedSum,
    MaskingClient,
    dequantize,
    quantize,
)

OFF = DPConfig()


def _results(rng, n=4, shapes=((3, 5), (7,))):
    return [
        {"client": k, "loss": 1.0, "weight": float(rng.integers(10, 100)),
         "update": [rng.normal(size=s).astype(np.float32) for s in shapes]}
        for k in range(n)
    ]  # fmt: skip


def _aggregate(results, **kwargs):
    options = {"dp": OFF, "expected_clients": len(results), "secure": False, "frac_bits": 16,
               "threshold": 0, "round_index": 3, "rng": np.random.default_rng(0)}  # fmt: skip
    return aggregate(results, results[0]["update"], **{**options, **kwargs})


def test_the_weighted_average_is_exact():
    results = _results(np.random.default_rng(0))
    delta, info = _aggregate(results)
    total = sum(r["weight"] for r in results)
    for i, got in enumerate(delta):
        want = sum(r["weight"] * r["update"][i].astype(np.float64) for r in results) / total
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert info["accepted"] == [0, 1, 2, 3]


def test_non_finite_updates_are_rejected_and_logged():
    results = _results(np.random.default_rng(1))
    results[2]["update"][0][0, 0] = np.nan
    notes = []
    delta, info = _aggregate(results, log=notes.append)
    assert info["accepted"] == [0, 1, 3] and "client 2" in notes[0]
    assert all(np.all(np.isfinite(d)) for d in delta)


def test_masks_cancel_and_a_masked_update_looks_like_noise():
    rng = np.random.default_rng(2)
    results = _results(rng, n=5, shapes=((64, 64),))
    scaled = [r["update"] for r in results]
    info = {}
    total = secure_sum(results, scaled, 16, 0, 7, (), info)
    plain = sum(r["update"][0].reshape(-1) for r in results)
    np.testing.assert_allclose(total, plain, atol=5 * 2.0**-17)  # quantisation only
    # what the server receives from one client: uniform 32-bit words, unrelated to the input
    parties = {k: MaskingClient(k, 7) for k in range(5)}
    public = {k: p.public_key for k, p in parties.items()}
    update = np.full(4096, 0.25, np.float32)  # a very non-random input
    words = parties[0].masked(update, public, 16)
    counts = np.bincount(words >> 24, minlength=256)  # top byte: 256 equally likely values
    chi2 = ((counts - 16.0) ** 2 / 16.0).sum()
    assert chi2 < 350  # 255 degrees of freedom: p > 0.0001 for uniform words
    assert len(np.unique(words)) > 4000 and words.dtype == np.uint32
    assert abs(np.corrcoef(words.astype(float), quantize(update, 16).astype(float) +
                           np.arange(4096))[0, 1]) < 0.1  # fmt: skip


def test_a_dropped_client_is_recovered_above_the_threshold():
    results = _results(np.random.default_rng(3), n=4, shapes=((100,),))
    scaled = [r["update"] for r in results]
    info = {}
    total = secure_sum(results, scaled, 16, 2, 1, drop=(2,), info=info)
    survivors = sum(r["update"][0] for r in results if r["client"] != 2)
    np.testing.assert_allclose(total, survivors, atol=4 * 2.0**-17)
    assert info["secure_dropped"] == [2]
    with pytest.raises(TrainingError, match="fewer than the threshold 3"):
        secure_sum(results, scaled, 16, 3, 1, drop=(1, 2), info={})


def test_quantisation_round_trip():
    values = np.array([-3.5, -1e-5, 0.0, 2.0**-16, 1234.25], np.float32)
    np.testing.assert_allclose(dequantize(quantize(values, 16), 16), values, atol=2.0**-17)
    server = MaskedSum({0: 1}, 3, 0, 16, 1)
    with pytest.raises(TrainingError, match="unexpected vector"):
        server.add(5, np.zeros(3, np.uint32))


def test_dp_noise_has_standard_deviation_z_times_clip():
    dp = DPConfig(clip=0.5, noise_multiplier=1.3, delta=1e-5)
    zero = [{"client": 0, "loss": 1.0, "weight": 1.0, "update": [np.zeros(200000, np.float32)]}]
    delta, _ = _aggregate(zero, dp=dp, expected_clients=4)
    assert float(np.std(delta[0]) * 4) == pytest.approx(1.3 * 0.5, rel=0.01)
    clipped, norm = clip_update([np.full(4, 3.0, np.float32)], 0.5)
    assert norm == pytest.approx(6.0) and np.linalg.norm(clipped[0]) == pytest.approx(0.5)


def test_epsilon_is_dp_accountings():
    dp = DPConfig(clip=1.0, noise_multiplier=1.1, delta=1e-5)
    got = epsilon(dp, 0.01, 1000)
    reference = RdpAccountant()
    event = dp_accounting.GaussianDpEvent(1.1)
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.01, event), 1000)
    assert got["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert 0 < got["epsilon_pld"] <= got["epsilon"] * 1.01  # PLD is the tighter bound
    assert epsilon(dp, 0.01, 2000)["epsilon"] > got["epsilon"]
    assert math.isinf(epsilon(DPConfig(clip=1.0), 0.1, 5)["epsilon"])  # clipping alone


def test_dp_settings_are_checked_and_sampling_is_seeded():
    with pytest.raises(ConfigError, match="--dp-noise-multiplier needs --dp-clip"):
        check_dp(0.0, 1.0, 0.0, 16)
    assert check_dp(1.0, 1.0, 0.0, 16).delta == 1e-5
    assert check_dp(1.0, 1.0, 0.0, 10).delta == 1e-5
    a = sample_clients(16, 4, 3, seed=1, poisson=False)
    assert a == sample_clients(16, 4, 3, seed=1, poisson=False) and len(a) == 4
    assert a != sample_clients(16, 4, 4, seed=1, poisson=False)
    sizes = [len(sample_clients(100, 10, r, 1, poisson=True)) for r in range(200)]
    assert abs(np.mean(sizes) - 10) < 1.0 and np.std(sizes) > 1  # Poisson: K on average
