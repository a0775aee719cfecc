"""`tokenizer_config.json`: a Hugging Face tokenizer's special tokens and chat template.

`tokenizer.json` holds the vocabulary and merges; the settings that decide how a
prompt is framed live beside it in `tokenizer_config.json`: the BOS/EOS/PAD token
strings, whether a BOS (`add_bos_token`) or EOS (`add_eos_token`) is added to
each encoded text, and the Jinja `chat_template`. DeepSeek's checkpoints add a
BOS, end replies with `<｜end▁of▁sentence｜>` and frame turns with `<｜User｜>` and
`<｜Assistant｜>`; a converted run keeps all of it.

`transformers` 5 saves the chat template in its own file, `chat_template.jinja`
(4.4x: `chat_template.json`), beside `tokenizer_config.json`; `read_dir` reads
all three as `transformers` does: `.jinja` over `.json` over the config's key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from deepseek_tf.errors import TokenizerError
from deepseek_tf.tokenizers.chat_template import ChatTemplate

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # highest precedence first
SETTINGS_FILES = (TOKENIZER_CONFIG_FILE, *CHAT_TEMPLATE_FILES)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value, key: str, origin: str) -> str | None:
    """A special token given as a string or as an `AddedToken` dict `{"content": ...}`."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{origin}: {key} must be a string or {{'content': str}}")
    return value


def _chat_template_text(value, origin: str) -> str | None:
    """`chat_template` as one string, or a list of `{"name", "template"}` (the "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(f"{origin}: must be a string or a list with a 'default' template")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read the tokenizer config ({e})") from None


def _template_file(directory: Path) -> tuple[Path, str] | None:
    """`(path, template text)` of the first chat template file in `directory`, or None."""
    for name in CHAT_TEMPLATE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            try:
                return path, path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{path}: cannot read the chat template ({e})") from None
        data = _read_json(path)
        template = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(template, (str, list)):
            raise TokenizerError(f"{path}: expected an object with a 'chat_template'")
        return path, template
    return None


@dataclass(frozen=True)
class TokenizerSettings:
    """The parts of `tokenizer_config.json` deepseek-tf honours.

    Attributes:
        bos_token, eos_token, pad_token, unk_token: special token strings (None: none).
        add_bos_token: prepend the BOS token when encoding a prompt.
        add_eos_token: append the EOS token when encoding a prompt.
        chat_template: the Jinja chat template (None: `PLAIN_TEMPLATE`).
        raw: the whole file, written back unchanged by `save`.
    """

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    raw: tuple = ()  # sorted (key, json text) pairs, kept hashable

    @classmethod
    def from_dict(
        cls, data: dict, origin: str = TOKENIZER_CONFIG_FILE, template_origin: str | None = None
    ) -> TokenizerSettings:
        """Validates `data` (errors name `origin`; a chat template's name `template_origin`,
        the file it came from when that is not `origin`)."""
        if not isinstance(data, dict):
            raise TokenizerError(f"{origin}: expected a JSON object")
        tokens = {k: _token_text(data.get(k), k, origin) for k in SPECIAL_TOKEN_KEYS}
        flags = {}
        for key in ("add_bos_token", "add_eos_token"):
            value = data.get(key, False)
            if not isinstance(value, bool):
                raise TokenizerError(f"{origin}: {key} must be true or false, got {value!r}")
            flags[key] = value
        template_origin = template_origin or f"{origin}: chat_template"
        template = _chat_template_text(data.get("chat_template"), template_origin)
        if template is not None:
            ChatTemplate(template, template_origin)  # compiles, or names the file
        raw = tuple(sorted((k, json.dumps(v, ensure_ascii=False)) for k, v in data.items()))
        return cls(**tokens, **flags, chat_template=template, raw=raw)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> TokenizerSettings:
        """Parses `path`; unreadable or malformed files raise TokenizerError naming it."""
        return cls.from_dict(_read_json(Path(path)), str(path))

    @classmethod
    def read_dir(cls, directory: str | os.PathLike[str]) -> TokenizerSettings | None:
        """The settings kept in `directory`: `tokenizer_config.json` with the chat template
        of `chat_template.jinja` or `chat_template.json` when there is one (which then
        wins, as in `transformers`); None when none of the three files is there."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_FILE
        data = _read_json(config_path) if config_path.is_file() else None
        template = _template_file(directory)
        if data is None and template is None:
            return None
        data = dict(data or {})
        if template is not None:
            data["chat_template"] = template[1]
        return cls.from_dict(data, str(config_path), str(template[0]) if template else None)

    def to_dict(self) -> dict:
        return {k: json.loads(v) for k, v in self.raw}

    def special_tokens(self) -> dict:
        """`{"bos_token": ..., ...}` for the chat template: the tokens that are set (as
        transformers passes them; an unset one is undefined in the template)."""
        return {k: getattr(self, k) for k in SPECIAL_TOKEN_KEYS if getattr(self, k) is not None}
