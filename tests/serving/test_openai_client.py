"""The server through the official `openai` client: completions, chat, streaming."""

import pytest

from deepseek_tf.generation.generate import Generator

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[2] + "/v1", api_key="unused", max_retries=0)


PROMPTS = ["ROMEO:\nWhat is", "Th", "First Citizen:"]


def test_greedy_completions_match_generator(client, loaded):
    model, tok = loaded
    expected = Generator(model).generate([tok.encode(p) for p in PROMPTS], 12)
    for prompt, ids in zip(PROMPTS, expected):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == tok.decode(ids)
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(tok.encode(prompt))
        assert out.usage.completion_tokens == 12


def test_concurrent_requests_are_batched_and_equal(client, server, loaded):
    from concurrent.futures import ThreadPoolExecutor

    model, tok = loaded
    expected = [
        tok.decode(ids) for ids in Generator(model).generate([tok.encode(p) for p in PROMPTS], 10)
    ]
    app = server[1]
    rows_before = app.batcher.rows

    def one(prompt):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(one, PROMPTS * 2))
    assert texts == expected * 2
    assert app.batcher.rows - rows_before == 6


def test_logprobs_and_seed(client):
    out = client.completions.create(
        model="tiny", prompt="Th", max_tokens=6, temperature=0.9, seed=7, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    again = client.completions.create(
        model="tiny", prompt="Th", max_tokens=6, temperature=0.9, seed=7
    )
    assert again.choices[0].text == out.choices[0].text


def test_stop_strings(client):
    full = client.completions.create(model="tiny", prompt="Th", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(
        model="tiny", prompt="Th", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="Th", max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_completion_equals_plain(client):
    plain = client.completions.create(model="tiny", prompt="Th", max_tokens=20, temperature=0)
    stream = client.completions.create(
        model="tiny", prompt="Th", max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 2  # several chunks, not one blob
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_and_chat_streaming(client, loaded):
    model, tok = loaded
    messages = [{"role": "user", "content": "Hi"}]
    prompt = "user: Hi\nassistant:"
    expected = tok.decode(Generator(model).generate([tok.encode(prompt)], 8)[0])
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        logprobs=True,
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == expected


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_bad_request_raises_openai_error(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model="tiny", prompt="Th", max_tokens=5, n=9
        )  # over the server's limit of 8
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Th", max_tokens=5)


def test_n_choices_are_the_seeded_single_requests(client):
    """`n` choices, each sampled as a single request with `seed + index` would be; streamed
    chunks carry their choice's index; usage counts the prompt once."""
    kwargs = dict(model="tiny", prompt="Th", max_tokens=8, temperature=0.9)
    out = client.completions.create(n=3, seed=7, **kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2]
    singles = [client.completions.create(seed=7 + i, **kwargs).choices[0].text for i in range(3)]
    assert [c.text for c in out.choices] == singles
    assert len(set(singles)) > 1  # different seeds, different samples
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 24
    stream = client.completions.create(n=3, seed=7, stream=True, **kwargs)
    texts, reasons = ["", "", ""], [None] * 3
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == singles and reasons == ["length"] * 3
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Th"}], max_tokens=4, n=2, seed=1
    )
    assert [c.index for c in chat.choices] == [0, 1]
