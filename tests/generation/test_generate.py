import pytest

from deepseek_tf.api.generation import generate, generate_texts
from deepseek_tf.errors import InputError
from deepseek_tf.generation.generate import Generator, generate_uncached


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_run):
    from deepseek_tf.api import load

    return load(trained_run)


@pytest.fixture(scope="module")
def generator(model_and_tokenizer):
    return Generator(model_and_tokenizer[0])


def test_cached_greedy_equals_full_recomputation(model_and_tokenizer, generator):
    model, tok = model_and_tokenizer
    prompts = [tok.encode("ROMEO:\nWhat is"), tok.encode("Th")]
    cached = generator.generate(prompts, 24)
    reference = [generate_uncached(model, p, 24) for p in prompts]
    assert cached == reference
    assert len(set(cached[0])) > 1  # a real sequence, not one repeated token
    # a batch of different lengths gives what each prompt gives alone
    assert generator.generate([prompts[1]], 24) == [cached[1]]


def test_sampling_options(model_and_tokenizer, generator):
    tok = model_and_tokenizer[1]
    prompt = [tok.encode("First Citizen:")]
    greedy = generator.generate(prompt, 16)
    assert generator.generate(prompt, 16, temperature=1.0, top_k=1, seed=5) == greedy
    a = generator.generate(prompt, 16, temperature=1.5, seed=1)
    assert generator.generate(prompt, 16, temperature=1.5, seed=1) == a
    assert generator.generate(prompt, 16, temperature=1.5, seed=2) != a
    nucleus = generator.generate(prompt, 16, temperature=1.0, top_p=1e-6, seed=3)
    assert nucleus == greedy  # a vanishing nucleus keeps only the best token


def test_stop_tokens_and_sliding_window(model_and_tokenizer, generator):
    model, tok = model_and_tokenizer
    prompt = [tok.encode("KING")]
    first = generator.generate(prompt, 1)[0][0]
    assert generator.generate(prompt, 10, stop_ids=[first]) == [[first]]
    long = generator.generate(prompt, model.max_seq_len * 2)
    assert len(long[0]) == model.max_seq_len * 2


def test_rows_of_a_batch_take_consecutive_seeds(model_and_tokenizer, generator):
    tok = model_and_tokenizer[1]
    a, b = tok.encode("First"), tok.encode("Second")
    batch = generator.generate([a, b], 10, temperature=1.0, seed=7)
    assert generator.generate([a], 10, temperature=1.0, seed=7) == [batch[0]]
    assert generator.generate([b], 10, temperature=1.0, seed=8) == [batch[1]]


def test_bad_settings(model_and_tokenizer, generator):
    prompt = [model_and_tokenizer[1].encode("A")]
    for kwargs, match in [
        ({"top_p": -0.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
    ]:
        with pytest.raises(InputError, match=match):
            generator.generate(prompt, 4, **kwargs)
    with pytest.raises(InputError, match="max_new_tokens"):
        generator.generate(prompt, 10**9)
    assert len(generator.generate(prompt, 3, temperature=1.0, seed=10**30)[0]) == 3


def test_bad_prompts(model_and_tokenizer, generator):
    model = model_and_tokenizer[0]
    with pytest.raises(InputError, match="more than the model's context"):
        generator.generate([[1] * (model.max_seq_len + 1)], 4)
    with pytest.raises(InputError, match="empty"):
        generator.generate([[]], 4)
    with pytest.raises(InputError, match="out of range"):
        generator.generate([[model.vocab_size]], 4)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"top_p": 2.0}, "--top-p"),
        ({"temperature": -1.0}, "--temperature"),
        ({"max_new_tokens": -1}, "--max-new-tokens: must be between 0 and"),
        ({"draft_tokens": 2}, "--draft-tokens needs --speculative mtp"),
        ({"speculative": "mtp", "draft_tokens": 0}, "--draft-tokens must be >= 1"),
        ({"speculative": "mtp", "show_uncertainty": True}, "--show-uncertainty is not avail"),
    ],
)
def test_generate_checks_its_options_before_loading(tmp_path, options, match):
    with pytest.raises(InputError, match=match):  # no run at all: nothing is read first
        generate(tmp_path / "nowhere", "ab", **options)


def test_texts_details_and_stop_texts(model_and_tokenizer):
    model, tok = model_and_tokenizer
    texts = generate_texts(model, tok, ["Th", "KING"], max_new_tokens=6, temperature=0.0)
    assert [t[:2] for t in texts] == ["Th", "KI"] and all(len(t) > 4 for t in texts)
    [(text, tokens)] = generate_texts(model, tok, ["Th"], max_new_tokens=3, temperature=0.0,
                                      details=True)  # fmt: skip
    assert texts[0].startswith(text) and len(tokens) == 3
    assert "".join(t for t, _, _ in tokens) == text[2:]
    assert all(entropy >= 0 and logprob <= 0 for _, entropy, logprob in tokens)
    first = tokens[0][0]  # a stop text ends the continuation after it
    stopped = generate_texts(model, tok, ["Th"], max_new_tokens=6, temperature=0.0, stop=[first])
    assert stopped == ["Th" + first]
    with pytest.raises(InputError, match="is 2 tokens; a stop must be one token"):
        generate_texts(model, tok, ["Th"], max_new_tokens=2, stop=["ab"])
