"""Repetition penalties and logit biases: the compiled decode loop against a plain numpy
reference (full recomputation, penalties applied by hand), and their input rules."""

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.generation.generate import Generator
from deepseek_tf.generation.penalties import apply_penalties, check_penalties
from deepseek_tf.generation.sampler import SamplingError, check_logit_bias


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_run):
    from deepseek_tf.api import load

    return load(trained_run)


def reference_greedy(model, prompt, n, presence, frequency, repetition, bias=None):
    """Greedy decoding by full recomputation, penalties applied in numpy as documented."""
    last_logits = tf.function(lambda ids: model(ids)[0, -1], autograph=False,
                              input_signature=[tf.TensorSpec((1, None), tf.int32)])  # fmt: skip
    ids, new = list(prompt), []
    for _ in range(n):
        logits = np.asarray(last_logits(tf.constant([ids], tf.int32)), np.float64)  # (V,)
        if bias:
            for token, value in bias.items():
                logits[token] += value
        seen = np.zeros_like(logits, bool)
        seen[ids] = True
        logits = np.where(
            seen, np.where(logits > 0, logits / repetition, logits * repetition), logits
        )
        counts = np.bincount(new, minlength=logits.size).astype(np.float64)
        logits = logits - frequency * counts - presence * (counts > 0)
        token = int(np.argmax(logits))
        new.append(token)
        ids.append(token)
    return new


def test_penalised_greedy_decoding_equals_the_reference(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok.encode("ROMEO:\nWhat is"), tok.encode("Th")]
    plain = [reference_greedy(model, prompt, 20, 0.0, 0.0, 1.0) for prompt in prompts]
    settings = dict(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4)
    generator = Generator(model)
    penalised = generator.generate(prompts, 20, **settings)
    for prompt, row in zip(prompts, penalised):
        assert row == reference_greedy(model, prompt, 20, 0.8, 0.6, 1.4)
    assert penalised != plain  # the penalties change what is written
    bias = {tok.encode("e")[0]: 3.0}
    both = generator.generate(prompts[:1], 12, logit_bias=bias, repetition_penalty=1.2)
    assert both[0] == reference_greedy(model, prompts[0], 12, 0.0, 0.0, 1.2, bias)


def test_apply_penalties_formula():
    logits = tf.constant([[2.0, -1.0, 0.5, 3.0]])
    counts = tf.constant([[0.0, 2.0, 1.0, 0.0]])
    seen = tf.constant([[True, True, True, False]])
    settings = (tf.constant([0.5]), tf.constant([0.25]), tf.constant([2.0]))
    out = apply_penalties(logits, (*settings, counts, seen)).numpy()[0]
    np.testing.assert_allclose(out, [1.0, -2.0 - 0.5 - 0.5, 0.25 - 0.25 - 0.5, 3.0])


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": "1"}, "repetition_penalty"),
    ],
)
def test_penalties_out_of_range_name_the_setting(kwargs, param):
    with pytest.raises(SamplingError) as e:
        check_penalties(
            kwargs.get("presence_penalty", 0.0),
            kwargs.get("frequency_penalty", 0.0),
            kwargs.get("repetition_penalty", 1.0),
        )
    assert e.value.param == param and param in str(e.value)


@pytest.mark.parametrize("bias", [{"a": 1}, {-1: 1}, {"100": 1}, {"3": 100.5}, {True: 1}, [1]])
def test_bad_logit_bias_is_refused(bias):
    with pytest.raises(SamplingError, match="logit_bias"):
        check_logit_bias(bias, 100)
    assert check_logit_bias({"7": -100, 3: 2.5}, 100) == ((3, 2.5), (7, -100.0))
