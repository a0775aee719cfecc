"""Token replacement and length jitter: rates, ranges, determinism, pipeline wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config.schema import DataConfig
from deepseek_tf.data.augment import (
    derive_seed,
    jitter_weights,
    packed_length,
    replace_tokens,
)
from deepseek_tf.data.pipeline import make_eval_dataset, make_train_dataset
from deepseek_tf.errors import ConfigError
from deepseek_tf.tokenizers import train_tokenizer


def test_packed_length():
    assert packed_length(DataConfig(seq_len=64)) == 64
    assert packed_length(DataConfig(seq_len=64, length_jitter=True)) == 71  # ceil(70.4)
    assert packed_length(DataConfig(seq_len=10, length_jitter=True)) == 11  # not 12
    frac = DataConfig(seq_len=10, length_jitter=True, length_jitter_frac=0.5)
    assert packed_length(frac) == 15


def test_replacement_rate_within_three_standard_errors():
    vocab, prob = 50, 0.05
    inputs = tf.random.stateless_uniform((256, 256), seed=(1, 2), maxval=vocab, dtype=tf.int32)
    out = replace_tokens(inputs, prob, vocab, derive_seed(0, 3, 0)).numpy()
    assert out.dtype == np.int32 and out.min() >= 0 and out.max() < vocab
    changed = float(np.mean(out != inputs.numpy()))
    rate = prob * (1 - 1 / vocab)  # a replacement may draw the original id
    stderr = math.sqrt(rate * (1 - rate) / out.size)
    assert abs(changed - rate) < 3 * stderr
    again = replace_tokens(inputs, prob, vocab, derive_seed(0, 3, 0)).numpy()
    other = replace_tokens(inputs, prob, vocab, derive_seed(0, 3, 1)).numpy()
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)


def test_jitter_lengths_span_the_range_with_mean_near_seq_len():
    seq_len, frac = 64, 0.25
    batch = tf.zeros((4096, 80), tf.int32)
    weights = jitter_weights(batch, seq_len, frac, derive_seed(0, 4, 0)).numpy()
    assert weights.shape == (4096, 80) and weights.dtype == np.float32
    lengths = weights.sum(axis=1).astype(int)
    np.testing.assert_array_equal(weights, np.arange(80)[None, :] < lengths[:, None])  # prefixes
    assert lengths.min() == 48 and lengths.max() == 80
    assert len(set(lengths.tolist())) == 33  # every length in [48, 80] occurs
    stderr = math.sqrt((33**2 - 1) / 12 / len(lengths))
    assert abs(lengths.mean() - seq_len) < 3 * stderr


def test_invalid_jitter_fraction_is_a_config_error():
    cfg = DataConfig(seq_len=8, length_jitter=True, length_jitter_frac=1.0)
    tok = train_tokenizer("char", texts=["ab"])
    with pytest.raises(ConfigError, match="data.length_jitter_frac"):
        make_train_dataset(cfg, tok, 2)


@pytest.fixture()
def positions(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(2000))
    path = tmp_path / "positions.txt"
    path.write_text(text, encoding="utf-8")
    return str(path), train_tokenizer("char", texts=[text])


def test_pipeline_replaces_inputs_only(positions):
    path, tok = positions
    cfg = DataConfig(files=(path,), seq_len=32, token_replace=True, token_replace_prob=0.1)
    batches = [tuple(t.numpy() for t in b) for b in make_train_dataset(cfg, tok, 16).take(20)]
    inputs = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(np.diff(targets, axis=1), 1)  # targets untouched
    original = targets - 1  # ids are positions: the input before each target
    rate = float(np.mean(inputs != original))
    stderr = math.sqrt(0.1 * 0.9 / inputs.size)
    assert abs(rate - 0.1 * (1 - 1 / tok.vocab_size)) < 3 * stderr
    assert all(np.all(b[2] == 1.0) for b in batches)


def test_pipeline_length_jitter_widens_blocks_and_masks(positions):
    path, tok = positions
    cfg = DataConfig(files=(path,), seq_len=20, length_jitter=True, length_jitter_frac=0.2)
    inputs, targets, weights = next(iter(make_train_dataset(cfg, tok, 64)))
    assert inputs.shape == targets.shape == weights.shape == (64, 24)
    np.testing.assert_array_equal(targets.numpy(), inputs.numpy() + 1)
    lengths = weights.numpy().sum(axis=1)
    assert lengths.min() >= 16 and lengths.max() <= 24 and len(set(lengths)) > 3
    eval_inputs, _, eval_weights = next(iter(make_eval_dataset(cfg, tok, 8)))
    assert eval_inputs.shape == (8, 20)  # evaluation never jitters
    assert np.all(eval_weights.numpy() == 1.0)
