"""SavedModel export: signatures match the Keras model and load without deepseek_tf."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.export.savedmodel import export_savedmodel
from deepseek_tf.generation.generate import Generator

PROMPTS = np.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]], np.int32)


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    model, tokenizer = loaded
    out = tmp_path_factory.mktemp("savedmodel") / "sm"
    report = export_savedmodel(model, out, tokenizer)
    return out, report, tf.saved_model.load(str(out))


def _generate(loaded_sm, ids, n, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    return loaded_sm.signatures["generate"](
        token_ids=tf.constant(ids, tf.int32),
        max_new_tokens=tf.constant(n, tf.int32),
        temperature=tf.constant(temperature, tf.float32),
        top_k=tf.constant(top_k, tf.int32),
        top_p=tf.constant(top_p, tf.float32),
        seed=tf.constant(seed, tf.int32),
    )["new_ids"].numpy()


def test_report_and_logits(exported, loaded):
    out, report, sm = exported
    model, _ = loaded
    assert report["max_abs_logit_diff"] < 1e-4
    assert set(report["signatures"]) >= {"serving_default", "score", "generate"}
    result = sm.signatures["serving_default"](token_ids=tf.constant(PROMPTS))
    want = np.asarray(model(PROMPTS))
    np.testing.assert_allclose(result["logits"].numpy(), want, atol=1e-4)
    np.testing.assert_array_equal(result["next_token"].numpy(), want[:, -1].argmax(-1))


def test_score_is_next_token_log_prob(exported, loaded):
    _, _, sm = exported
    model, _ = loaded
    got = sm.signatures["score"](token_ids=tf.constant(PROMPTS))["log_probs"].numpy()
    logits = np.asarray(model(PROMPTS), np.float64)[:, :-1]  # (B, T - 1, V)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(log_probs, PROMPTS[:, 1:, None], -1)[..., 0]  # (B, T - 1)
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_generate_greedy_matches_generator(exported, loaded):
    _, _, sm = exported
    model, _ = loaded
    got = _generate(sm, PROMPTS, 12)
    assert got.tolist() == Generator(model, jit_compile=False).generate(PROMPTS.tolist(), 12)


def test_generate_sampled_matches_eager_generator(exported, loaded):
    _, _, sm = exported
    model, _ = loaded
    kwargs = {"temperature": 0.9, "top_k": 8, "top_p": 0.95, "seed": 3}
    got = _generate(sm, PROMPTS, 6, **kwargs)
    want = Generator(model, jit_compile=False).generate(PROMPTS.tolist(), 6, **kwargs)
    assert got.tolist() == want


def test_generate_stops_at_context(exported, loaded):
    _, _, sm = exported
    model, _ = loaded
    ids = np.ones((1, model.max_seq_len - 2), np.int32)
    assert _generate(sm, ids, 10).shape == (1, 2)


def test_generate_text_char_tokenizer(exported, loaded):
    _, report, sm = exported
    model, tokenizer = loaded
    assert "generate_text" in report["signatures"]
    text = (
        sm.signatures["generate_text"](
            text=tf.constant("the "),
            max_new_tokens=tf.constant(5),
            temperature=tf.constant(0.0),
            top_k=tf.constant(0),
            top_p=tf.constant(1.0),
            seed=tf.constant(0),
        )["text"]
        .numpy()
        .decode()
    )
    new = Generator(model).generate([tokenizer.encode("the ")], 5)[0]
    assert text == "the " + tokenizer.decode(new)


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    return env


def test_loads_without_deepseek_tf(exported):
    out, _, _ = exported
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(out)!r})\n"
        "r = m.signatures['serving_default'](token_ids=tf.constant([[1, 2, 3]], tf.int32))\n"
        "assert 'deepseek_tf' not in sys.modules\n"
        "print('OK', r['logits'].shape, int(r['next_token'][0]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd="/"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout


def test_saved_model_cli_run(exported):
    out, _, _ = exported
    cli = Path(sys.executable).parent / "saved_model_cli"
    proc = subprocess.run(
        [
            str(cli), "run", "--dir", str(out), "--tag_set", "serve",
            "--signature_def", "serving_default", "--input_exprs", "token_ids=[[1,2,3]]",
        ],
        capture_output=True, text=True, env=_env(), cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "next_token" in proc.stdout
