"""Byte-level BPE tokenizer backed by Hugging Face `tokenizers` (GPT-2 style)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from deepseek_tf.errors import ConfigError, TokenizerError
from deepseek_tf.tokenizers.base import BPE_FILE, EOS_TOKEN, Tokenizer, stderr_line
from deepseek_tf.tokenizers.chat_template import ChatTemplate
from deepseek_tf.tokenizers.tokenizer_settings import TOKENIZER_CONFIG_FILE, TokenizerSettings

MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-text token
# Four times the largest vocabularies in use (~256k). The `tokenizers` library aborts the
# process (a Rust panic) on a target near 2**31, so larger ones are refused before it runs.
MAX_BPE_VOCAB = 1 << 20


class BPETokenizer(Tokenizer):
    """Byte-level BPE: every byte is a symbol, so any Unicode text round-trips exactly.

    Args:
        hf_tokenizer: a `tokenizers.Tokenizer` (ByteLevel pre-tokenizer and decoder).
    """

    kind = "bpe"
    file_name = BPE_FILE
    hugging_face_format = True

    def __init__(
        self, hf_tokenizer: HFTokenizer, settings: TokenizerSettings | None = None
    ) -> None:
        self._tok = hf_tokenizer
        self.settings = settings or TokenizerSettings()
        for key, token in self.settings.special_tokens().items():
            if key in ("bos_token", "eos_token") and self._tok.token_to_id(token) is None:
                raise TokenizerError(
                    f"{TOKENIZER_CONFIG_FILE}: {key} {token!r} is not in the vocabulary"
                )

    @classmethod
    def check_vocab_size(cls, vocab_size: int) -> None:
        """Refuses a target below `MIN_BPE_VOCAB` (the byte alphabet and <|endoftext|>) or
        above `MAX_BPE_VOCAB` (1,048,576) with a one-line `ConfigError`."""
        if vocab_size < MIN_BPE_VOCAB:
            raise ConfigError(
                f"bpe vocab_size {vocab_size} is below {MIN_BPE_VOCAB} "
                "(256 byte symbols + <|endoftext|>)"
            )
        if vocab_size > MAX_BPE_VOCAB:
            raise ConfigError(
                f"bpe vocab_size {vocab_size:,} is above the limit of {MAX_BPE_VOCAB:,} "
                "tokens (the largest vocabularies in use have about 256,000)"
            )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, log=stderr_line) -> BPETokenizer:
        """Train on `texts` (any iterable: a generator streams) up to `vocab_size` ids.

        When the merges run out first (too little text), the vocabulary is smaller and
        one warning line saying so goes to `log` (default stderr).

        Raises:
            ConfigError: `vocab_size` out of range (see `check_vocab_size`).
        """
        cls.check_vocab_size(vocab_size)
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(iter(texts), trainer=trainer)
        reached = tok.get_vocab_size(with_added_tokens=True)
        if reached < vocab_size:
            log(
                f"[tokenizer] warning: the bpe vocabulary reached only {reached:,} of the "
                f"{vocab_size:,} tokens asked for (the text has no more pairs to merge; "
                "train on more text or ask for fewer)"
            )
        return cls(tok)

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self._tok.token_to_id(self.settings.eos_token or EOS_TOKEN)

    @property
    def bos_id(self) -> int | None:
        token = self.settings.bos_token
        return None if token is None else self._tok.token_to_id(token)

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:  # compiled once, not per request
        if self.settings.chat_template is None:
            return super().chat_template
        return ChatTemplate(self.settings.chat_template, f"{TOKENIZER_CONFIG_FILE}: chat_template")

    def special_tokens(self) -> dict:
        return self.settings.special_tokens()

    def encode_prompt(self, text: str) -> list[int]:
        # tokenizer.json's post-processor (DeepSeek's prepends the BOS), then the
        # settings' flags where it has not already done so (as LlamaTokenizerFast
        # builds its post-processor from add_bos_token / add_eos_token).
        ids = self._tok.encode(text, add_special_tokens=True).ids
        bos, eos = self.bos_id, self.eos_id
        if self.settings.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        if self.settings.add_eos_token and eos is not None and ids[-1:] != [eos]:
            ids = [*ids, eos]
        return ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def _decode_checked(self, ids: list[int]) -> str:
        # Special tokens are kept so that decode(encode(text)) == text even when the
        # text contains "<|endoftext|>".
        return self._tok.decode(ids, skip_special_tokens=False)

    def _encode_bytes(self, text: bytes | np.ndarray) -> np.ndarray:
        raw = np.asarray(text).item()  # bytes in graph mode, a 0-d array when eager
        return np.asarray(self.encode(raw.decode("utf-8")), dtype=np.int32)

    def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
        ids = tf.numpy_function(self._encode_bytes, [text], tf.int32, stateful=False)
        ids.set_shape([None])  # (N,)
        return ids

    def _write(self, path: str) -> None:
        self._tok.save(path)

    def save(self, directory) -> str:
        """Writes `tokenizer.json` and, with settings, `tokenizer_config.json` beside it
        (each atomically); without settings a stale `tokenizer_config.json` is removed."""
        path = super().save(directory)
        config_path = os.path.join(os.fspath(directory), TOKENIZER_CONFIG_FILE)
        if self.settings.raw:
            text = json.dumps(self.settings.to_dict(), indent=2, ensure_ascii=False) + "\n"
            tmp = config_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, config_path)
        elif os.path.isfile(config_path):
            os.remove(config_path)
        return path

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        """Read a Hugging Face `tokenizer.json` and the settings beside it
        (`TokenizerSettings.read_dir`: `tokenizer_config.json`, `chat_template.jinja`);
        unreadable files raise TokenizerError naming them."""
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot read tokenizer ({e})") from None
        return cls(tok, TokenizerSettings.read_dir(os.path.dirname(path) or "."))
