"""A run with DeepSeek's tokenizer settings: `generate --chat` and `/v1/chat/completions`
render its chat template, add its BOS to completion prompts, and stop at its EOS."""

import dataclasses
import sys
from pathlib import Path

import pytest
from serving_helpers import request, start_server

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
from deepseek_style import BOS, write_deepseek_tokenizer  # noqa: E402

from deepseek_tf.api import load  # noqa: E402
from deepseek_tf.cli.main import main  # noqa: E402
from deepseek_tf.models.builder import build_model  # noqa: E402
from deepseek_tf.rundir import RunDir  # noqa: E402
from deepseek_tf.tokenizers import load_tokenizer  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
GREEDY = {"temperature": 0.0, "seed": 0}


def _make_run(path: Path, tiny_config, tokenizer_dir: Path) -> Path:
    tokenizer = load_tokenizer(tokenizer_dir)
    model_config = dataclasses.replace(tiny_config.model, vocab_size=tokenizer.vocab_size)
    config = dataclasses.replace(tiny_config, model=model_config)
    RunDir(path).write_weights_run(config, tokenizer, build_model(config))
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("chat")
    return _make_run(root / "run", tiny_config, write_deepseek_tokenizer(root / "tok"))


def _serve_chat(run, body):
    model, tokenizer = load(run)
    srv, app, url = start_server(model, tokenizer, max_tokens=32)
    try:
        return request(url, "POST", "/v1/chat/completions", body)
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()


def test_served_chat_uses_the_template_and_matches_generate_chat(chat_run, capsys):
    status, body = _serve_chat(chat_run, {"messages": [MESSAGES[1]], "max_tokens": 6, **GREEDY})
    assert status == 200, body
    tokenizer = load_tokenizer(chat_run)
    expected_ids = tokenizer.encode_chat([MESSAGES[1]])
    assert expected_ids[0] == tokenizer.bos_id  # the template's BOS, then <｜User｜>...
    assert body["usage"]["prompt_tokens"] == len(expected_ids)
    args = ["generate", str(chat_run), "--chat", "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main([*args, "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == body["choices"][0]["message"]["content"]


def test_system_message_and_bos_reach_the_prompt(chat_run):
    status, body = _serve_chat(chat_run, {"messages": MESSAGES, "max_tokens": 1, **GREEDY})
    assert status == 200, body
    tokenizer = load_tokenizer(chat_run)
    rendered = tokenizer.apply_chat_template(MESSAGES)
    assert rendered.startswith(BOS + "Be brief.<｜User｜>Hello")
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered))


def test_completion_prompt_gets_the_bos(chat_run):
    model, tokenizer = load(chat_run)
    srv, app, url = start_server(model, tokenizer, max_tokens=8)
    try:
        status, body = request(url, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
    finally:
        srv.shutdown()
        srv.server_close()
        app.batcher.stop()
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("Hi")) + 1


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_eos_from_tokenizer_config_ends_the_reply(tmp_path, tiny_config, chat_run, capsys):
    """Make the greedy first reply token the EOS: the reply is then empty, and stops."""
    tokenizer = load_tokenizer(chat_run)
    model, _ = load(chat_run)
    from deepseek_tf.generation.generate import Generator

    first = Generator(model).generate([tokenizer.encode_chat([MESSAGES[1]])], 1, temperature=0)
    eos = tokenizer.hf_tokenizer.id_to_token(int(first[0][0]))
    tok_dir = write_deepseek_tokenizer(tmp_path / "tok", eos_token=eos)
    run = tmp_path / "run"
    RunDir(run).write_weights_run(RunDir(chat_run).read_config(), load_tokenizer(tok_dir), model)
    status, body = _serve_chat(run, {"messages": [MESSAGES[1]], "max_tokens": 6, **GREEDY})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == ""
    args = ["generate", str(run), "--chat", "--prompt", "Hello", "--temperature", "0"]
    assert main(args) == 0
    assert capsys.readouterr().out == "\n"
