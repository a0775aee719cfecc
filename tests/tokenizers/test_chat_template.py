"""Chat templates and `tokenizer_config.json` settings (BOS/EOS, add_bos_token)."""

import json

import pytest
from deepseek_style import BOS, EOS, write_deepseek_tokenizer

from deepseek_tf.errors import TokenizerError
from deepseek_tf.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer
from deepseek_tf.tokenizers.chat_template import ChatTemplate
from deepseek_tf.tokenizers.tokenizer_settings import TokenizerSettings

CONVERSATIONS = [
    [{"role": "user", "content": "What is the weather in Zürich?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "The answer?"},
    ],
    [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny, 21 °C"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thank you"},
    ],
    [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
            ],
        },
        {"role": "tool", "content": "sunny"},
    ],
]


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return write_deepseek_tokenizer(tmp_path_factory.mktemp("ds_tok"))


def test_settings_are_read_beside_tokenizer_json(deepseek_dir):
    tok = load_tokenizer(deepseek_dir)
    assert isinstance(tok, BPETokenizer)
    assert tok.settings.add_bos_token and tok.settings.bos_token == BOS
    assert tok.eos_id == tok.hf_tokenizer.token_to_id(EOS)
    assert tok.bos_id == tok.hf_tokenizer.token_to_id(BOS)
    ids = tok.encode_prompt("The answer is")
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("The answer is")


def test_deepseek_template_renders_turns_and_generation_prompt(deepseek_dir):
    tok = load_tokenizer(deepseek_dir)
    text = tok.apply_chat_template(CONVERSATIONS[1])
    assert text == (
        f"{BOS}You are a helpful assistant.\n\nBe brief.<｜User｜>Hello<｜Assistant｜>"
        f"Hello! How can I help?{EOS}<｜User｜>The answer?<｜Assistant｜>"
    )
    ids = tok.encode_chat(CONVERSATIONS[1])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # the template's BOS only
    assert tok.hf_tokenizer.token_to_id("<｜Assistant｜>") == ids[-1]


def test_saving_keeps_the_settings(deepseek_dir, tmp_path):
    tok = load_tokenizer(deepseek_dir)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.settings == tok.settings
    assert again.apply_chat_template(CONVERSATIONS[2]) == tok.apply_chat_template(CONVERSATIONS[2])


def _template_dir(root, files: dict):
    """`deepseek_dir`'s tokenizer with the chat template taken out of its config and the
    given template files written beside it."""
    directory = write_deepseek_tokenizer(root)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template")
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_template_files_of_transformers_4_and_5_are_read(tmp_path):
    jinja = "J{% for m in messages %}{{ m['content'] }}{% endfor %}"
    legacy = json.dumps({"chat_template": "L{{ messages | length }}"})
    hello = [{"role": "user", "content": "Hi"}]
    only_jinja = load_tokenizer(_template_dir(tmp_path / "a", {"chat_template.jinja": jinja}))
    assert only_jinja.apply_chat_template(hello) == "JHi"
    only_json = load_tokenizer(_template_dir(tmp_path / "b", {"chat_template.json": legacy}))
    assert only_json.apply_chat_template(hello) == "L1"
    both = {"chat_template.jinja": jinja, "chat_template.json": legacy}
    assert load_tokenizer(_template_dir(tmp_path / "c", both)).apply_chat_template(hello) == "JHi"
    over_config = write_deepseek_tokenizer(tmp_path / "d")  # a template in the config too
    (over_config / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    assert load_tokenizer(over_config).apply_chat_template(hello) == "JHi"
    saved = tmp_path / "saved"
    only_jinja.save(saved)  # written back into tokenizer_config.json, which every version reads
    assert load_tokenizer(saved).apply_chat_template(hello) == "JHi"


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("chat_template.json", "{not json", "cannot read"),
        ("chat_template.json", '{"template": "x"}', "'chat_template'"),
        ("chat_template.jinja", "{% for %}", "does not compile"),
    ],
)
def test_bad_template_files_name_the_file(tmp_path, name, text, message):
    directory = _template_dir(tmp_path, {name: text})
    with pytest.raises(TokenizerError, match=message) as e:
        load_tokenizer(directory)
    assert name in str(e.value)


def test_each_files_errors_name_that_file(tmp_path):
    """With a chat_template.jinja beside it, a bad token in tokenizer_config.json is
    reported as the config's, and a bad template as the .jinja's only."""
    good = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    directory = _template_dir(tmp_path / "a", {"chat_template.jinja": good})
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": 7}))
    with pytest.raises(TokenizerError, match="eos_token must be a string") as e:
        load_tokenizer(directory)
    assert "tokenizer_config.json" in str(e.value) and ".jinja" not in str(e.value)
    directory = _template_dir(tmp_path / "b", {"chat_template.jinja": "{% for %}"})
    with pytest.raises(TokenizerError, match="does not compile") as e:
        load_tokenizer(directory)
    assert "chat_template.jinja" in str(e.value) and "tokenizer_config" not in str(e.value)


def test_plain_template_without_settings():
    tok = CharTokenizer.train(["system: Be brief.\nuser: Hello\nassistant:"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert tok.apply_chat_template(messages) == "system: Be brief.\nuser: Hello\nassistant:"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "system: Be brief.\nuser: Hello\n"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"chat_template": "{% for m in messages %}"}, "does not compile"),
        ({"chat_template": 3}, "chat_template: must be a string"),
        ({"add_bos_token": "yes"}, "add_bos_token must be true or false"),
        ({"bos_token": "<never-seen>"}, "bos_token '<never-seen>' is not in the vocabulary"),
        ({"eos_token": 7}, "eos_token must be a string"),
    ],
)
def test_bad_tokenizer_config_names_the_key(tmp_path, settings, message):
    write_deepseek_tokenizer(tmp_path, **settings)
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer_config.json" in str(info.value)


def test_unreadable_tokenizer_config(tmp_path):
    write_deepseek_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes(b"{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: cannot read"):
        load_tokenizer(tmp_path)


def test_template_exceptions_become_tokenizer_errors(deepseek_dir):
    tok = load_tokenizer(deepseek_dir)
    with pytest.raises(TokenizerError, match="unsupported role: developer"):
        tok.apply_chat_template([{"role": "developer", "content": "x"}])


def test_sandbox_blocks_attribute_escapes():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError):
        template.render([])


def test_chat_template_list_form_takes_default():
    settings = TokenizerSettings.from_dict(
        {
            "chat_template": [
                {"name": "tool_use", "template": "T"},
                {"name": "default", "template": "D"},
            ]
        }
    )
    assert settings.chat_template == "D"
    assert json.loads(dict(settings.raw)["chat_template"])[1]["template"] == "D"


@pytest.mark.hf
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_equals_transformers(deepseek_dir, conversation, generation_prompt):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(deepseek_dir)
    messages = CONVERSATIONS[conversation]
    ours = load_tokenizer(deepseek_dir)
    expected = reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert ours.apply_chat_template(messages, generation_prompt) == expected
    if generation_prompt:
        ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert ours.encode_chat(messages) == list(ids)


@pytest.mark.hf
def test_prompt_encoding_equals_transformers(deepseek_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(deepseek_dir)
    ours = load_tokenizer(deepseek_dir)
    for text in ("The answer is", "Zürich, 21 °C", BOS + "x"):
        assert ours.encode_prompt(text) == reference(text)["input_ids"], text
