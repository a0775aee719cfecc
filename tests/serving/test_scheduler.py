"""The continuous-batching scheduler: joins mid-batch, same tokens as `generate`, prefix
cache, cancellation, warm-up."""

import time

import numpy as np
import pytest

from deepseek_tf.config.loader import apply_overrides
from deepseek_tf.generation.generate import Generator
from deepseek_tf.models.builder import build_model
from deepseek_tf.serving.batcher import Batcher
from deepseek_tf.serving.job import Scheduler
from deepseek_tf.serving.protocol import GenRequest
from deepseek_tf.serving.scheduler import ContinuousScheduler

VOCAB = 41


def request(prompt, max_tokens, temperature=0.0, seed=3, stream=False):
    return GenRequest("completion", "m", None, list(prompt), max_tokens=max_tokens,
                      temperature=temperature, seed=seed, stream=stream)  # fmt: skip


def wait(job, timeout=120):
    deadline = time.monotonic() + timeout
    while not job.finished:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.005)
    return job


@pytest.fixture(scope="module")
def attention_model(tiny_config):
    """Attention blocks only (a cache of keys and values: any shared prefix is reusable)."""
    config = apply_overrides(tiny_config, ["model.blocks=[attention]", "model.init_std=0.2"])
    return build_model(config, vocab_size=VOCAB, seed=1)


@pytest.fixture(scope="module")
def scheduler(attention_model):
    # min_span 16: decode calls read 16, 32 or all 48 positions, as the rows grow
    s = ContinuousScheduler(attention_model, None, max_batch=4, step_ms=5, min_span=16).start()
    assert s.ready.wait(300) and s.rows_cache.spans() == [16, 32, 48]
    yield s
    s.stop()


def test_both_schedulers_offer_what_the_server_needs(scheduler, attention_model):
    dynamic = Batcher(attention_model, None, max_batch=2)
    assert not dynamic.ready.is_set()  # ready once its thread runs (after any warm-up)
    dynamic.start()
    try:
        for s in (scheduler, dynamic):
            assert isinstance(s, Scheduler)
            assert s.ready.wait(60) and s.running() == 0 and s.pending() == 0
    finally:
        dynamic.stop()
    assert dynamic.prefix is None and scheduler.prefix.enabled

    class NoRunning:  # a scheduler missing one member is not one
        ready, rows, prefix = scheduler.ready, 0, None
        submit, stop, start, pending = (lambda *a: None,) * 4

    assert not isinstance(NoRunning(), Scheduler)


def test_requests_join_a_running_batch_and_get_generates_tokens(scheduler, attention_model):
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, VOCAB, n).tolist() for n in (5, 11, 3, 7, 9)]
    settings = [(0.0, 3), (0.9, 4), (0.0, 5), (1.2, 6), (0.7, 7)]
    long = scheduler.submit(request(prompts[0], 40))
    while not long.tokens:  # the first request is decoding ...
        time.sleep(0.002)
    jobs = [long] + [scheduler.submit(request(p, 12, t, s))
                     for p, (t, s) in zip(prompts[1:], settings[1:])]  # fmt: skip
    first_of_second = None
    while not jobs[1].finished:
        if first_of_second is None and jobs[1].tokens:
            first_of_second = len(long.tokens)
        time.sleep(0.002)
    for job in jobs:
        wait(job)
    # ... and the second got its first token before the first request ended
    assert first_of_second is not None and first_of_second < 40
    # every row, through every span it crossed (the first ends at position 44), decodes
    # what `generate` (its cache sized to the request) gives
    generator = Generator(attention_model)
    for job, prompt, (temperature, seed) in zip(jobs, prompts, settings):
        n = job.req.max_tokens
        expected = generator.generate([prompt], n, temperature=temperature, seed=seed)[0]
        assert job.tokens == expected and job.finish_reason == "length"
        assert job.first_token_at is not None and job.finished_at >= job.first_token_at


def test_prompts_admitted_together_are_prefilled_as_one_group(attention_model):
    """Three prompts of different lengths waiting together: one padded call (a group of
    4: the first prompt twice), each row's logits at its own end, the tokens `generate`
    gives."""
    s = ContinuousScheduler(attention_model, None, max_batch=4, step_ms=5, warm_up=False)
    prompts = [[5, 1, 7], [2, 9, 4, 4, 8, 1, 3, 6, 2], list(range(1, 13))]
    settings = [(0.0, 3), (0.9, 4), (1.1, 5)]
    jobs = [s.submit(request(p, 6, t, seed)) for p, (t, seed) in zip(prompts, settings)]
    s.start()  # admits after its warm-up: all three wait together
    try:
        for job in jobs:
            wait(job)
        assert s.prefiller.grouped == 3 and s.prefiller.groups == (1, 4)
        generator = Generator(attention_model)
        for job, prompt, (temperature, seed) in zip(jobs, prompts, settings):
            expected = generator.generate([prompt], 6, temperature=temperature, seed=seed)[0]
            assert job.tokens == expected and job.cached_tokens == 0
    finally:
        s.stop()


def test_prefix_cache_reuses_a_shared_prefix_with_the_same_tokens(attention_model):
    rng = np.random.RandomState(1)
    system = rng.randint(0, VOCAB, 20).tolist()
    # traced, not XLA-compiled: this is the cache's logic (the tokens of an XLA-compiled
    # scheduler are `test_same_tokens_everywhere`'s)
    plain = dict(max_batch=2, warm_up=False, jit_compile=False)
    cold = ContinuousScheduler(attention_model, None, prefix_cache_mb=0, **plain).start()
    # spans of 16, 32, 48 positions: entries are rows of the span that held them
    warm = ContinuousScheduler(attention_model, None, min_span=16, **plain).start()
    try:
        wait(warm.submit(request(system[:12], 3)))  # leaves a 16-position entry ...
        first = wait(warm.submit(request(system + [1, 2], 6)))  # ... grown to 32 for this
        assert first.cached_tokens >= 12
        assert first.tokens == wait(cold.submit(request(system + [1, 2], 6))).tokens
        for tail in ([3, 4, 5], [7]):
            hit = wait(warm.submit(request(system + tail, 6)))
            plain = wait(cold.submit(request(system + tail, 6)))
            assert hit.cached_tokens == 20 and plain.cached_tokens == 0
            assert hit.tokens == plain.tokens
        # a chat's next turn: the earlier prompt and its reply come from the cache
        turn = system + [1, 2] + first.tokens + [9]
        again = wait(warm.submit(request(turn, 4)))
        assert again.cached_tokens == len(turn) - 1
        assert again.tokens == wait(cold.submit(request(turn, 4))).tokens
        assert 0 < warm.prefix.hit_rate < 1 and cold.prefix.hit_rate == 0
        assert warm.metrics.prefix_hit._value.get() == warm.prefix.hit_tokens
    finally:
        cold.stop()
        warm.stop()


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_hybrid_models_reuse_only_whole_entries(tiny_config):
    model = build_model(tiny_config, vocab_size=VOCAB, seed=2)  # attention + hybrid blocks
    s = ContinuousScheduler(model, None, max_batch=2, warm_up=False).start()
    try:
        assert s.prefix.exact_only
        base = list(range(1, 15))
        wait(s.submit(request(base, 3)))
        partial = wait(s.submit(request(base[:10] + [30, 31], 3)))
        assert partial.cached_tokens == 0  # a conv state is that of the entry's last token
        whole = wait(s.submit(request(base + [30], 3)))
        assert whole.cached_tokens == len(base)
        assert whole.tokens == Generator(model).generate([base + [30]], 3)[0]
    finally:
        s.stop()


def test_cancelled_row_frees_its_slot_within_one_call(scheduler):
    job = scheduler.submit(request([1, 2, 3], 40, stream=True))
    while not job.tokens:
        time.sleep(0.002)
    job.cancelled = True
    deadline = time.monotonic() + 30
    while scheduler.running():
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert len(job.tokens) < 40 and scheduler.abandoned >= 1


def test_warm_up_compiles_every_shape_before_ready(scheduler):
    traces = scheduler.rows_cache.traces()
    # one decode program per span: with or without `logit_bias` is the same program
    assert traces == len(scheduler.rows_cache.spans())
    prefill = scheduler.loop.prefill_program.experimental_get_tracing_count()
    rng = np.random.RandomState(2)
    for n in (1, 6, 17, 40):  # prompts of many lengths, greedy and sampled
        wait(scheduler.submit(request(rng.randint(0, VOCAB, n).tolist(), 5, 0.8)))
    biased = request(rng.randint(0, VOCAB, 9).tolist(), 5)
    biased.logit_bias = ((3, -100.0), (7, 5.0))
    assert 3 not in wait(scheduler.submit(biased)).tokens
    # a group of prompts admitted together (into free slots of the idle scheduler)
    prompts = [rng.randint(0, VOCAB, n).tolist() for n in (2, 9, 13)]
    scheduler.prefiller.group([1, 2, 3], prompts, [0, 0, 0])
    assert scheduler.rows_cache.traces() == traces
    assert scheduler.loop.prefill_program.experimental_get_tracing_count() == prefill


def test_a_traced_scheduler_traces_one_decode_program_per_span(attention_model):
    """Without XLA a decode call always takes a bias (zeros when no row has one): one
    trace per span, not one with and one without, and the tokens `generate` gives."""
    s = ContinuousScheduler(attention_model, None, max_batch=2, step_ms=5, min_span=16,
                            jit_compile=False).start()  # fmt: skip
    try:
        assert s.ready.wait(300)
        assert s.rows_cache.traces() == len(s.rows_cache.spans()) == 3
        prompt = [3, 1, 4, 1, 5]
        job = wait(s.submit(request(prompt, 10)))
        expected = Generator(attention_model, jit_compile=False).generate([prompt], 10)[0]
        assert job.tokens == expected and s.rows_cache.traces() == 3
    finally:
        s.stop()
