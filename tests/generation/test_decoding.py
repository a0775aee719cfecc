"""The one decode loop: chunked steps equal one run, rows independent of their batch."""

import pytest

from deepseek_tf.generation.decoding import (
    Decoder,
    Row,
    cache_length,
    pad_batch,
    prefill_chunks,
)
from deepseek_tf.generation.generate import Generator


@pytest.fixture(scope="module")
def decoder(loaded):
    return Decoder(loaded[0], logprobs=True)


def run(decoder, rows, chunk=5):
    state = decoder.start(rows)
    out = [[] for _ in rows]
    while not state.finished:
        for i, new in enumerate(state.step(chunk)):
            out[i] += [entry[0] for entry in new]
    return out


def test_layout_rules():
    assert [prefill_chunks(n) for n in (1, 2, 3, 8, 13)] == [[1], [2], [2, 1], [8], [8, 4, 1]]
    assert all(sum(prefill_chunks(n)) == n for n in range(1, 600))
    assert [pad_batch(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert (cache_length(1, 48), cache_length(65, 500), cache_length(65, 100)) == (48, 128, 100)


def test_chunked_greedy_batch_of_mixed_lengths_equals_generator(loaded, decoder):
    model, tok = loaded
    prompts = [tok.encode("ROMEO:\nWhat is"), tok.encode("Th"), tok.encode("First Citizen:")]
    expected = Generator(model).generate(prompts, 14)
    assert run(decoder, [Row(p, 14) for p in prompts]) == expected
    # rows with different max_new_tokens stop at their own length
    lengths = [len(t) for t in run(decoder, [Row(prompts[0], 3), Row(prompts[1], 11)])]
    assert lengths == [3, 11]


def test_seeded_row_does_not_depend_on_its_batch_or_chunking(loaded, decoder):
    tok = loaded[1]
    row = Row(tok.encode("Th"), 12, temperature=1.0, top_k=20, top_p=0.9, seed=42)
    alone = run(decoder, [row])[0]
    batched = run(decoder, [Row(tok.encode("ROMEO:"), 6), row, Row(tok.encode("A"), 9, 1.2)])
    assert batched[1] == alone
    assert run(decoder, [row], chunk=100)[0] == alone
    assert run(decoder, [Row(row.prompt, 12, 1.0, 20, 0.9, seed=43)])[0] != alone


def test_logprobs_are_the_models_log_softmax(loaded, decoder):
    import numpy as np

    model, tok = loaded
    prompt = tok.encode("KING")
    state = decoder.start([Row(prompt, 3)])
    new = state.step()[0]
    logits = np.asarray(model([prompt]))[0, -1].astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum())
    token, logprob, alts, _ = new[0]
    assert token == int(np.argmax(logits))
    assert logprob == pytest.approx(log_probs[token], abs=1e-4)
    assert [a for a, _ in alts] == list(np.argsort(-log_probs)[:5])
