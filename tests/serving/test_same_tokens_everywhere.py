"""One decode loop, one sampler: `deepseek-tf generate`, `/v1/completions` and the
SavedModel `generate` signature give the same tokens for the same prompt and settings."""

import numpy as np
import pytest
import tensorflow as tf
from serving_helpers import forward_greedy, request, start_server

from deepseek_tf.cli.main import main
from deepseek_tf.export.savedmodel import export_savedmodel

SETTINGS = [
    {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0},
    {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 11},
    {"temperature": 1.3, "top_k": 0, "top_p": 0.8, "seed": 123456789012},
]
PROMPT = "ROMEO:\nWhat"
NEW = 24


@pytest.fixture(scope="module")
def paths(trained_run, loaded, tmp_path_factory):
    model, tokenizer = loaded
    saved = tmp_path_factory.mktemp("same") / "sm"
    export_savedmodel(model, saved, tokenizer, verify=False)
    srv, app, url = start_server(model, tokenizer)
    yield trained_run, tf.saved_model.load(str(saved)), url
    srv.shutdown()
    srv.server_close()
    app.batcher.stop()


@pytest.mark.parametrize("s", SETTINGS, ids=["greedy", "top-k+top-p", "big-seed"])
def test_generate_serve_and_savedmodel_agree(paths, loaded, capsys, s):
    run, saved, url = paths
    tokenizer = loaded[1]
    args = ["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", str(NEW)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in s.items()]
    assert main(args) == 0
    cli = capsys.readouterr().out.rstrip("\n")[len(PROMPT) :]

    status, body = request(
        url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": NEW, **s}
    )
    assert status == 200, body
    served = body["choices"][0]["text"]

    ids = np.asarray([tokenizer.encode(PROMPT)], np.int32)
    new = saved.signatures["generate"](
        token_ids=tf.constant(ids),
        max_new_tokens=tf.constant(NEW),
        temperature=tf.constant(s["temperature"], tf.float32),
        top_k=tf.constant(s["top_k"]),
        top_p=tf.constant(s["top_p"], tf.float32),
        seed=tf.constant(s["seed"] % 2**31),
    )["new_ids"].numpy()[0]
    exported = tokenizer.decode(new.tolist())

    assert len(cli) == NEW and cli == served == exported, (cli, served, exported)


def test_logit_bias_gives_the_same_tokens_in_generate_and_both_schedulers(paths, loaded):
    """`logit_bias` and penalties through the Python API and the continuous and dynamic
    servers: a -100 bias bans the greedy reply's first tokens, +5 favours a character, the
    penalties discourage repeats; all three agree."""
    from deepseek_tf.generation.generate import Generator

    model, tokenizer = loaded
    _, _, url = paths
    ids = tokenizer.encode(PROMPT)
    plain = forward_greedy(model, [ids], NEW, tokenizer.vocab_size)[0]  # the unbiased reply
    favoured = next(t for t in tokenizer.encode("ezq") if t not in plain[:2])
    bias = {str(plain[0]): -100, str(plain[1]): -100, str(favoured): 5}
    settings = {"temperature": 0.9, "seed": 3, "presence_penalty": 0.5, "repetition_penalty": 1.3}
    biased = Generator(model).generate([ids], NEW, logit_bias=bias, **settings)[0]
    assert plain[0] not in biased and plain[1] not in biased
    srv, app, dynamic = start_server(model, tokenizer, batching="dynamic")
    try:
        for base in (url, dynamic):
            body = {"prompt": PROMPT, "max_tokens": NEW, "logit_bias": bias, **settings}
            status, answer = request(base, "POST", "/v1/completions", body)
            assert status == 200, answer
            assert answer["choices"][0]["text"] == tokenizer.decode(biased), base
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()
    for bad in ({"x": 1}, {"-1": 1}, {"10000": 1}, {"3": 101}, {"3": "1"}, [1]):
        body = {"prompt": PROMPT, "max_tokens": 2, "logit_bias": bad}
        status, answer = request(url, "POST", "/v1/completions", body)
        assert status == 400 and answer["error"]["param"] == "logit_bias", (bad, answer)
    for key, value in [("presence_penalty", 3), ("frequency_penalty", "1"),
                       ("repetition_penalty", 0)]:  # fmt: skip
        body = {"prompt": PROMPT, "max_tokens": 2, key: value}
        status, answer = request(url, "POST", "/v1/completions", body)
        assert status == 400 and answer["error"]["param"] == key, (key, answer)
