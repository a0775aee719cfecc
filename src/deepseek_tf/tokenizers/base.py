"""The tokenizer interface shared by the character and byte-level BPE tokenizers."""

from __future__ import annotations

import abc
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import RunDirError, TokenizerError
from deepseek_tf.tokenizers.chat_template import PLAIN_TEMPLATE, ChatTemplate

CHAR_FILE = "char_tokenizer.json"  # written by CharTokenizer.save
BPE_FILE = "tokenizer.json"  # standard Hugging Face tokenizer file, written by BPETokenizer.save
EOS_TOKEN = "<|endoftext|>"


def stderr_line(message: str) -> None:
    """The default `log` of training: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


class Tokenizer(abc.ABC):
    """Maps text to int token ids and back, in Python and inside a tf.data graph.

    Subclasses set `kind` ("char" or "bpe") and implement the abstract methods. What
    differs between the kinds is asked of the tokenizer (`unknown_char`, `drop_unknown`,
    `count_tokens`, `char_table`, `hugging_face_format`, `check_vocab_size`), never
    decided by testing its class or `kind`.

    Args:
        (none): concrete tokenizers are built by `train_tokenizer` or `load_tokenizer`.
    """

    kind: str = ""
    file_name: str = ""  # the file `save` writes (CHAR_FILE or BPE_FILE)
    hugging_face_format: bool = False  # `save` writes a tokenizer.json transformers reads

    @classmethod
    def check_vocab_size(cls, vocab_size: int) -> None:
        """Raises a one-line `ConfigError` for a `vocab_size` this kind cannot train to
        (checked before any text is read). The base accepts any: a vocabulary that is
        the set of characters seen ignores it."""
        return None

    @classmethod
    @abc.abstractmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, log=stderr_line) -> Tokenizer:
        """A tokenizer trained on `texts` (any iterable: a generator streams), with up
        to `vocab_size` ids where the kind has a target size; `log` takes warning lines."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id lies in [0, vocab_size)."""

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-text token, or None when the vocabulary has none."""
        return None

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return None

    @property
    def chat_template(self) -> ChatTemplate:
        """The run's chat template (`PLAIN_TEMPLATE` unless the tokenizer ships one)."""
        return ChatTemplate(PLAIN_TEMPLATE, "the plain chat template")

    def special_tokens(self) -> dict:
        """Special token strings the chat template may read (`bos_token`, ...)."""
        return {}

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools=None
    ) -> str:
        """The conversation `[{"role", "content"}, ...]` as prompt text, rendered as
        `transformers`' `apply_chat_template(..., tokenize=False, tools=tools)` renders it
        (`tools`: OpenAI tool objects, or None)."""
        return self.chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **self.special_tokens(),
        )

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt to continue: `encode`, plus the BOS (and EOS) token where
        the tokenizer's settings add them (`add_bos_token`, `add_eos_token`)."""
        return self.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation ending in the assistant's turn; special tokens come
        from the template's text (no BOS added twice)."""
        return self.encode(self.apply_chat_template(messages))

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; raises TokenizerError for text it cannot represent."""

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a 1-D int64 array (bulk tokenizing, e.g. `data prepare`)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The number of tokens of each of `texts` (which the tokenizer can encode)."""
        return [len(ids) for ids in self.encode_batch(texts)]

    def unknown_char(self, text: str) -> tuple[int, str] | None:
        """`(position, character)` of the first character of `text` the tokenizer cannot
        encode, or None (always None for a byte-level tokenizer: it encodes any text)."""
        return None

    def drop_unknown(self, text: str) -> str:
        """`text` without the characters the tokenizer cannot encode."""
        return text

    @property
    def char_table(self) -> tuple[str, ...] | None:
        """The character of each id when every token is one character (then a graph can
        hold the tokenizer as two lookup tables, e.g. a SavedModel's `generate_text`);
        None otherwise."""
        return None

    @abc.abstractmethod
    def _decode_checked(self, ids: list[int]) -> str:
        """Text of `ids`, which `decode` has already range-checked."""

    @abc.abstractmethod
    def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
        """Scalar tf.string -> 1-D int32 token ids; usable inside `tf.data.Dataset.map`."""

    @abc.abstractmethod
    def _write(self, path: str) -> None:
        """Write this tokenizer's file to `path`."""

    def save(self, directory: str | os.PathLike[str]) -> str:
        """Write the tokenizer into `directory` (created if needed); returns the file path.

        The file is replaced atomically (written beside it, then renamed), so a process
        killed while saving leaves the previous tokenizer intact. A tokenizer file of the
        other kind in `directory` is removed, so that `load_tokenizer(directory)` finds
        this tokenizer.

        Raises:
            RunDirError: `directory` is an existing file, or cannot be created.
        """
        directory = os.fspath(directory)
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise RunDirError(
                f"{directory} is an existing file; save the tokenizer into a directory"
            )
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"{directory}: cannot create the directory ({e.strerror})") from None
        path = os.path.join(directory, self.file_name)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.file_name}.", suffix=".tmp")
        os.close(fd)
        try:
            self._write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        for name in (CHAR_FILE, BPE_FILE):
            other = os.path.join(directory, name)
            if other != path and os.path.isfile(other):
                os.remove(other)
        return path

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` applied to every text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; an id outside [0, vocab_size) raises TokenizerError naming it."""
        checked = [int(i) for i in ids]
        size = self.vocab_size
        for i in checked:
            if not 0 <= i < size:
                raise TokenizerError(f"token id {i} is out of range for vocabulary size {size}")
        return self._decode_checked(checked)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"
