"""The one sampler: its rules for settings, its filters and its seeded noise."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.errors import InputError
from deepseek_tf.generation.sampler import check_sampling, sample_tokens, uniform_noise


def _sample(logits, temperature, top_k, top_p, seeds, position=0):
    n = len(seeds)
    return sample_tokens(
        tf.constant(logits, tf.float32),
        tf.fill((n,), float(temperature)),
        tf.fill((n,), int(top_k)),
        tf.fill((n,), float(top_p)),
        tf.constant(seeds, tf.int32),
        tf.constant(position, tf.int32),
    ).numpy()


def test_distribution_top_k_top_p_and_greedy():
    n = 4000
    logits = np.log(np.array([[0.1, 0.2, 0.7]] * n, np.float32))
    counts = np.bincount(_sample(logits, 1.0, 0, 1.0, np.arange(n)), minlength=3) / n
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.7], atol=0.03)
    assert set(_sample(logits, 1.0, 0, 0.5, np.arange(n)).tolist()) == {2}  # the 0.7 token
    assert set(_sample(logits, 1.0, 2, 1.0, np.arange(n)).tolist()) == {1, 2}
    assert set(_sample(logits, 1.0, 1, 1.0, np.arange(n)).tolist()) == {2}
    assert set(_sample(logits, 0.0, 0, 1.0, np.arange(n)).tolist()) == {2}


def test_noise_is_uniform_and_keyed_by_seed_and_position():
    noise = uniform_noise(tf.constant([1, 2]), tf.constant(3), 4096).numpy()
    assert noise.min() > 0 and noise.max() < 1 and abs(noise.mean() - 0.5) < 0.02
    again = uniform_noise(tf.constant([2]), tf.constant(3), 4096).numpy()
    np.testing.assert_array_equal(again[0], noise[1])  # a row's noise ignores its batch
    moved = uniform_noise(tf.constant([2]), tf.constant(4), 4096).numpy()
    assert not np.array_equal(moved[0], noise[1])


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, param):
    with pytest.raises(InputError, match=param) as info:
        check_sampling(**kwargs)
    assert info.value.param == param


def test_settings_are_normalised():
    assert check_sampling(seed=10**5000).seed == 10**5000 % 2**31  # any int is a seed
    assert check_sampling(temperature=1.0, top_p=0.0).temperature == 0.0  # empty nucleus
    assert check_sampling(temperature=2, top_k=3).top_k == 3


def test_noise_stays_below_one_so_an_impossible_token_is_never_drawn():
    """Seed 3 at position 9 hashes token 98,579 to the largest value: with 24 bits of
    noise it rounded to 1.0, whose Gumbel noise is +inf, and the 1.46B demonstration's
    `generate` drew that id past its 355-token tokenizer ("token id 98579 is out of
    range")."""
    noise = uniform_noise(tf.constant([3]), tf.constant(9), 102_400).numpy()
    assert noise.max() < 1.0 and noise.min() > 0.0
    logits = tf.concat([tf.zeros((1, 355)), tf.fill((1, 102_400 - 355), -1e9)], axis=1)
    token = sample_tokens(logits, tf.constant([1.0]), tf.constant([0]), tf.constant([1.0]),
                          tf.constant([3]), tf.constant(9))  # fmt: skip
    assert int(token[0]) < 355
