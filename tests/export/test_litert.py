"""LiteRT export: fixed-shape prefill/decode signatures run in ai_edge_litert."""

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from deepseek_tf.errors import InputError  # noqa: E402
from deepseek_tf.export.litert import LiteRTRunner, export_litert  # noqa: E402
from deepseek_tf.generation.generate import Generator  # noqa: E402

PREFILL = 8


@pytest.fixture(scope="module")
def tflite(loaded, tmp_path_factory):
    model, _ = loaded
    path = tmp_path_factory.mktemp("litert") / "model.tflite"
    report = export_litert(model, path, prefill_len=PREFILL)
    return path, report


def test_report_and_signatures(tflite):
    path, report = tflite
    assert report["max_abs_logit_diff"] < 1e-4
    runner = LiteRTRunner(path)
    assert runner.prefill_len == PREFILL
    assert set(runner.interpreter.get_signature_list()) == {"prefill", "decode"}


@pytest.mark.parametrize("length", [3, PREFILL, PREFILL + 4])
def test_logits_match_keras(tflite, loaded, length):
    path, _ = tflite
    model, _ = loaded
    ids = np.random.default_rng(length).integers(0, model.vocab_size, length).astype(np.int32)
    got = LiteRTRunner(path).logits(ids)  # decode only, prefill only, prefill + decode
    np.testing.assert_allclose(got, np.asarray(model(ids[None]))[0], atol=1e-4)


def test_generate_matches_generator(tflite, loaded):
    """Greedy and sampled: the runner's loop uses the one sampler, keyed by seed and
    position, so it picks the tokens `Generator` picks."""
    path, _ = tflite
    model, _ = loaded
    prompt = list(range(1, PREFILL + 2))
    assert LiteRTRunner(path).generate(prompt, 10) == Generator(model).generate([prompt], 10)[0]
    sampled = {"temperature": 0.9, "top_k": 12, "top_p": 0.95, "seed": 5}
    want = Generator(model).generate([prompt], 12, **sampled)[0]
    assert LiteRTRunner(path).generate(prompt, 12, **sampled) == want
    assert LiteRTRunner(path).generate(prompt, 12, **{**sampled, "seed": 6}) != want


def test_int8_weights(loaded, tmp_path):
    model, _ = loaded
    report = export_litert(model, tmp_path / "q.tflite", prefill_len=4, int8=True)
    assert report["int8"] and report["max_abs_logit_diff"] < 0.1


def test_bad_prefill_len(loaded, tmp_path):
    model, _ = loaded
    with pytest.raises(InputError, match="prefill length"):
        export_litert(model, tmp_path / "x.tflite", prefill_len=model.max_seq_len + 1)


def test_moe_mla_model(tmp_path):
    """tiny-moe (MLA with absorbed latent cache, DeepSeekMoE, hybrid conv) converts."""
    from deepseek_tf.config.loader import load_config
    from deepseek_tf.models.builder import build_model

    model = build_model(load_config("tiny-moe"), vocab_size=40, seed=0)
    report = export_litert(model, tmp_path / "moe.tflite", prefill_len=4)
    assert report["max_abs_logit_diff"] < 1e-4
