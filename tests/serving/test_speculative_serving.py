"""`serve --speculative mtp`: the MTP modules draft, the model verifies; greedy answers
equal plain decoding's, acceptance shows in /metrics, a model without MTP is refused."""

import pytest
from serving_helpers import request, start_server

from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.errors import InputError
from deepseek_tf.generation.generate import Generator
from deepseek_tf.models.builder import build_model
from deepseek_tf.serving.server import ServingApp

VOCAB = 37


@pytest.fixture(scope="module")
def mtp_model():
    config = apply_overrides(load_config("tiny-moe"), ["model.init_std=0.2"])
    return build_model(config, vocab_size=VOCAB, seed=4)


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_speculative_server_gives_plain_greedy_tokens(mtp_model):
    srv, app, url = start_server(mtp_model, None, speculative="mtp")
    try:
        prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
        for prompt in prompts:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
            status, answer = request(url, "POST", "/v1/completions", body)
            assert status == 200, answer
            got = [int(t) for t in answer["choices"][0]["text"].split()]
            assert got == Generator(mtp_model).generate([prompt], 12)[0]
        status, metrics = request(url, "GET", "/metrics")
        drafted = [line for line in metrics.splitlines()
                   if line.startswith("deepseek_tf_spec_draft_tokens_total")]  # fmt: skip
        assert status == 200 and drafted and float(drafted[0].split()[-1]) > 0
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()


def test_speculative_needs_mtp_modules(loaded):
    with pytest.raises(InputError, match="MTP modules"):
        ServingApp(*loaded, "tiny", speculative="mtp")
    with pytest.raises(InputError, match="--speculative"):
        ServingApp(*loaded, "tiny", speculative="medusa")


@pytest.mark.parametrize("warm_up", [True, False])
def test_speculative_server_is_ready_after_compiling(mtp_model, warm_up):
    """`/health` says ready only once the draft-verify rounds are traced (no request sent:
    the warm-up did it), or at once without warm-up."""
    srv, app, url = start_server(mtp_model, None, speculative="mtp", warm_up=warm_up,
                                 jit_compile=False)  # fmt: skip
    try:
        loop = app.batcher.decoder.loop
        traced = loop.rounds.experimental_get_tracing_count()
        assert (traced >= 1) == warm_up and request(url, "GET", "/health")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()
