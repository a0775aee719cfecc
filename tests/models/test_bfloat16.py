"""`train.precision: bfloat16`: bf16 variables (router float32), used by converted
checkpoints and fine-tuning; decoding, training and clipping in pure bfloat16."""

import numpy as np
import pytest

from deepseek_tf.api import train
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import apply_overrides, load_config
from deepseek_tf.generation.generate import Generator
from deepseek_tf.models.builder import build_model
from deepseek_tf.rundir import RunDir


@pytest.fixture(scope="module")
def models():
    c32 = load_config("tiny-moe")
    c16 = apply_overrides(c32, ["train.precision=bfloat16"])
    m32, m16 = build_model(c32, 96, seed=0), build_model(c16, 96)
    m16.set_weights(m32.get_weights())
    return m32, m16


def test_variables_are_bfloat16_but_the_router(models):
    _, m16 = models
    dtypes = {v.path: v.dtype for v in m16.weights}
    routers = {p for p in dtypes if "/gate/" in p}
    assert routers and all(dtypes[p] == "float32" for p in routers)
    assert all(dtypes[p] == "bfloat16" for p in dtypes if p not in routers)


def test_bfloat16_logits_stay_near_float32(models):
    m32, m16 = models
    ids = np.random.default_rng(0).integers(0, 96, (2, 20)).astype(np.int32)
    want, got = np.asarray(m32(ids)), np.asarray(m16(ids), np.float32)
    assert 0 < np.abs(got - want).max() < 0.03 * np.abs(want).max()


def test_cached_decoding_equals_full_forward_in_bfloat16(models):
    _, m16 = models
    prompt = [5, 17, 3, 60, 2]
    cached = Generator(m16).generate([prompt], 8, temperature=0)[0]
    seq = list(prompt)
    for _ in range(8):
        logits = np.asarray(m16(np.asarray([seq], np.int32)), np.float32)
        seq.append(int(np.argmax(logits[0, -1])))
    assert cached == seq[len(prompt) :]


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_bfloat16_training_clips_and_learns(tmp_path):
    config = apply_overrides(
        load_config("tiny-moe"),
        ["train.precision=bfloat16", "train.steps=12", "train.eval_every=0",
         "train.log_every=2", "train.clip_norm=0.5"],
    )  # fmt: skip
    train(config, out=tmp_path / "run", verbose=0, sample_tokens=0)
    history = RunDir(tmp_path / "run").metrics.read()
    losses = [h["loss"] for h in history if "loss" in h]
    norms = [h["grad_norm"] for h in history if "grad_norm" in h]
    assert len(losses) >= 5
    assert losses[-1] < losses[0] and all(np.isfinite(norms))
    # the bfloat16 run evaluates and generates like any other (no float32 copy made)
    assert main(["eval", str(tmp_path / "run"), "--max-batches", "1"]) == 0
    assert main(["generate", str(tmp_path / "run"), "--prompt", "RO", "--max-new-tokens", "4"]) == 0
