"""The server's chunked decoder against `Generator`, and its per-row sampling."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.generation.generate import Generator
from deepseek_tf.serving.decoder import ChunkedDecoder, Row, _uniform_noise, sample_rows


@pytest.fixture(scope="module")
def decoder(loaded):
    return ChunkedDecoder(loaded[0], chunk=5)


def run(decoder, rows):
    state = decoder.start(rows)
    out = [[] for _ in rows]
    while not state.finished:
        for i, new in enumerate(state.step()):
            out[i] += [t for t, _, _ in new]
    return out


def test_greedy_batch_of_mixed_lengths_equals_generator(loaded, decoder):
    model, tok = loaded
    prompts = [tok.encode("ROMEO:\nWhat is"), tok.encode("Th"), tok.encode("First Citizen:")]
    expected = Generator(model).generate(prompts, 14)
    assert run(decoder, [Row(p, 14) for p in prompts]) == expected
    # rows with different max_new_tokens stop at their own length
    lengths = [len(t) for t in run(decoder, [Row(prompts[0], 3), Row(prompts[1], 11)])]
    assert lengths == [3, 11]


def test_seeded_row_does_not_depend_on_its_batch(loaded, decoder):
    tok = loaded[1]
    row = Row(tok.encode("Th"), 12, temperature=1.0, top_p=0.9, seed=42)
    alone = run(decoder, [row])[0]
    batched = run(decoder, [Row(tok.encode("ROMEO:"), 6), row, Row(tok.encode("A"), 9, 1.2)])
    assert batched[1] == alone
    assert run(decoder, [Row(row.prompt, 12, 1.0, 0.9, seed=43)])[0] != alone


def test_sampling_distribution_and_nucleus():
    noise = _uniform_noise(tf.constant([1, 2]), tf.constant(3), 4096).numpy()
    assert noise.min() > 0 and noise.max() < 1 and abs(noise.mean() - 0.5) < 0.02
    n = 4000
    logits = tf.math.log(tf.constant([[0.1, 0.2, 0.7]] * n))
    ones, seeds = tf.ones(n), tf.range(n)
    counts = np.bincount(sample_rows(logits, ones, ones, seeds, 0).numpy(), minlength=3) / n
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.7], atol=0.03)
    nucleus = sample_rows(logits, ones, tf.fill((n,), 0.5), seeds, 0).numpy()
    assert set(nucleus.tolist()) == {2}  # top_p=0.5 keeps only the 0.7 token
    greedy = sample_rows(logits, tf.zeros(n), ones, seeds, 0).numpy()
    assert set(greedy.tolist()) == {2}
