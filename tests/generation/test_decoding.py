"""The one decode loop: chunked steps equal one run, rows independent of their batch."""

import pytest

from deepseek_tf.generation.decoder import Decoder, Row
from deepseek_tf.generation.decoding import cache_length, pad_batch, prefill_chunks
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


def test_one_padded_prefill_equals_the_chunked_prefill():
    """A positional cache (attention / MLA only) prefills 13 tokens as one padded call of
    16: the same last logits and cache positions as the chunks 8, 4, 1, and generation
    from it gives the plain greedy reference's tokens. A convolution state is not padded."""
    import numpy as np
    import tensorflow as tf
    from serving_helpers import forward_greedy

    from deepseek_tf.config.loader import load_config
    from deepseek_tf.generation.decoding import DecodeLoop, positional_cache, prefill_bucket
    from deepseek_tf.models.builder import build_model

    assert [prefill_bucket(n) for n in (1, 2, 3, 13, 16, 17)] == [1, 2, 4, 16, 16, 32]
    config = load_config("tiny-moe", overrides=["model.blocks=[attention]"])
    model = build_model(config, 40, seed=1)
    assert positional_cache(model)
    loop = DecodeLoop(model, jit_compile=False)
    ids = tf.constant(np.random.RandomState(0).randint(1, 40, (2, 13)), tf.int32)
    padded, cache_p = loop.prefill(ids, model.init_cache(2, 48), room=48)
    assert loop.prefill_program.experimental_get_tracing_count() == 1  # one call (of 16)
    chunked, cache_c = loop.prefill(ids, model.init_cache(2, 48))
    np.testing.assert_allclose(padded, chunked, rtol=1e-5, atol=1e-5)
    for p, c in zip(tf.nest.flatten(cache_p), tf.nest.flatten(cache_c)):
        np.testing.assert_allclose(p[:, :13], c[:, :13], rtol=1e-5, atol=1e-5)
    prompt = ids.numpy()[0].tolist()
    got = Generator(model, jit_compile=False).generate([prompt], 12)
    assert got == forward_greedy(model, [prompt], 12)
    hybrid = build_model(load_config("tiny-moe"), 40, seed=1)
    assert not positional_cache(hybrid)


def test_prefill_leaves_xla_where_the_weights_do_not_fit_the_cpus_cache(loaded):
    """XLA's CPU backend prefilled the 1.46B demonstration 1.3-2.1x slower than
    TensorFlow's kernels, and a cache-resident model faster (decode_real, serve_load): on
    a CPU-only machine the prefill leaves XLA exactly when the weights exceed the cache."""
    from deepseek_tf.generation.memory_bound import accelerated, weight_bytes, xla_prefill

    if accelerated():
        pytest.skip("an accelerator is present: the prefill follows jit_compile there")
    model = loaded[0]
    weights = weight_bytes(model)
    assert xla_prefill(model, True, cache_bytes=weights) is True  # held in cache
    assert xla_prefill(model, True, cache_bytes=weights - 1) is False  # read from memory
    assert xla_prefill(model, False, cache_bytes=weights) is False
    assert xla_prefill(model, True, cache_bytes=0) is True  # cache size unknown: as asked


def test_decode_leaves_xla_for_16_bit_weights_that_do_not_fit_the_cpus_cache(trained_run):
    """XLA's CPU backend multiplies bfloat16 weights through hoisted float32 copies (the
    1.46B demonstration: 10.2 GB against 4.0 GB, decode_real): the token step and loop
    leave XLA for 16-bit weights beyond the cache, and keep it for float32 weights (XLA
    stepped them 1.3x faster than TensorFlow's kernels) and for weights held in cache."""
    from deepseek_tf.generation.decoding import DecodeLoop
    from deepseek_tf.generation.memory_bound import (
        accelerated,
        fits_in_cache,
        weight_bytes,
        xla_decode,
    )
    from deepseek_tf.models.builder import build_model
    from deepseek_tf.rundir import RunDir

    if accelerated():
        pytest.skip("an accelerator is present: decoding follows jit_compile there")
    config = RunDir(trained_run).read_config()
    half, full = build_model(config, dtype="bfloat16"), build_model(config, dtype="float32")
    weights = weight_bytes(half)
    assert xla_decode(half, True, cache_bytes=weights) is True  # held in cache
    assert xla_decode(half, True, cache_bytes=weights - 1) is False  # read from memory
    assert xla_decode(half, False, cache_bytes=weights) is False
    assert xla_decode(full, True, cache_bytes=weight_bytes(full) - 1) is True
    assert xla_decode(half, True, cache_bytes=0) is True  # cache size unknown: as asked
    # the loop the server and `generate` share applies it with this machine's cache
    assert DecodeLoop(half).jit_compile is (fits_in_cache(half) is not False)


def test_a_memory_bound_models_first_prefill_runs_eagerly_and_equals_the_program(loaded):
    """A model beyond the CPU's cache prefills without XLA, its first prompt eagerly (no
    trace before the first token), later prompts through the traced program: the same
    logits and cache both ways."""
    import numpy as np
    import tensorflow as tf

    from deepseek_tf.generation.decoding import DecodeLoop
    from deepseek_tf.generation.memory_bound import accelerated

    if accelerated():
        pytest.skip("an accelerator is present: the prefill follows jit_compile there")
    model, tok = loaded
    loop = DecodeLoop(model, cache_bytes=1)  # every weight "read from memory"
    assert loop.jit_compile  # float32 weights keep XLA for the step
    ids = tf.constant([tok.encode("ROMEO:\nWhat is")[:8]], tf.int32)  # one call, padded or not
    runs = []
    for traces in (0, 1):
        logits, cache = loop.prefill(ids, model.init_cache(1, 64), room=64)
        assert loop.prefill_program.experimental_get_tracing_count() == traces
        runs.append((np.asarray(logits), [np.asarray(t) for t in tf.nest.flatten(cache)]))
    np.testing.assert_allclose(runs[0][0], runs[1][0], atol=1e-5)
    for eager, traced in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(eager, traced, atol=1e-5)
