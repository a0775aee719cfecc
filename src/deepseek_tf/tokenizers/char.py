"""Character-level tokenizer: one id per Unicode code point of the training text."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from deepseek_tf.errors import TokenizerError
from deepseek_tf.tokenizers.base import CHAR_FILE, Tokenizer


class CharTokenizer(Tokenizer):
    """Ids are positions in the sorted list of the training text's characters (as nanoGPT).

    Args:
        chars: the vocabulary, distinct single characters; id i is `chars[i]`.
    """

    kind = "char"
    file_name = CHAR_FILE

    def __init__(self, chars: Iterable[str]) -> None:
        self._chars = tuple(chars)
        if not self._chars:
            raise TokenizerError("char tokenizer: the vocabulary is empty")
        for c in self._chars:
            if not isinstance(c, str) or len(c) != 1:
                raise TokenizerError(f"char tokenizer: vocabulary entry {c!r} is not one character")
        if len(set(self._chars)) != len(self._chars):
            raise TokenizerError("char tokenizer: the vocabulary has duplicate characters")
        self._stoi = {c: i for i, c in enumerate(self._chars)}
        self._table: tf.lookup.StaticHashTable | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # encode_array's index

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int | None = None, *, log=None
    ) -> CharTokenizer:
        """Vocabulary = sorted set of all characters in `texts` (`vocab_size` and `log`
        are not used: the characters seen are the vocabulary)."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise TokenizerError("char tokenizer: cannot train on empty text")
        return cls(sorted(chars))

    @property
    def chars(self) -> tuple[str, ...]:
        """The vocabulary; id i is `chars[i]`."""
        return self._chars

    @property
    def char_table(self) -> tuple[str, ...]:
        """The vocabulary: every token is one character."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    def unknown_char(self, text: str) -> tuple[int, str] | None:
        """(position, character) of the first character outside the vocabulary, or None."""
        unknown = set(text).difference(self._stoi)
        if not unknown:
            return None
        pos = min(text.index(c) for c in unknown)
        return pos, text[pos]

    def drop_unknown(self, text: str) -> str:
        """`text` without the characters outside the vocabulary."""
        return "".join(c for c in text if c in self._stoi)

    def count_tokens(self, texts) -> list[int]:
        """One token per character (of text within the vocabulary)."""
        return [len(text) for text in texts]

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError:
            pos, c = self.unknown_char(text)  # type: ignore[misc]
            raise TokenizerError(
                f"character {c!r} at position {pos} is not in the char tokenizer's vocabulary"
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` vectorised: code points (UTF-32) looked up in the sorted vocabulary."""
        if self._sorted is None:
            points = np.array([ord(c) for c in self._chars], dtype=np.uint32)
            order = np.argsort(points)
            self._sorted = (points[order], order.astype(np.int64))
        keys, ids = self._sorted
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (N,)
        at = np.minimum(np.searchsorted(keys, points), len(keys) - 1)
        if not np.array_equal(keys[at], points):
            self.encode(text)  # raises, naming the first unknown character
        return ids[at]

    def _decode_checked(self, ids: list[int]) -> str:
        return "".join(self._chars[i] for i in ids)

    def _lookup_table(self) -> tf.lookup.StaticHashTable:
        # Built once, eagerly (init_scope), so a table first needed while tracing a
        # tf.data function is not owned by that function's graph.
        if self._table is None:
            with tf.init_scope():
                keys = tf.constant([ord(c) for c in self._chars], tf.int32)
                values = tf.range(len(self._chars), dtype=tf.int32)
                init = tf.lookup.KeyValueTensorInitializer(keys, values)
                self._table = tf.lookup.StaticHashTable(init, default_value=-1)
        return self._table

    def tf_encode(self, text: tf.Tensor) -> tf.Tensor:
        codepoints = tf.strings.unicode_decode(text, "UTF-8")  # (N,) int32
        ids = self._lookup_table().lookup(codepoints)  # (N,) int32, -1 if unknown
        check = tf.debugging.assert_non_negative(
            ids, message="text has a character outside the char tokenizer's vocabulary"
        )
        with tf.control_dependencies([check]):
            return tf.identity(ids)

    def _write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"kind": "char", "chars": list(self._chars)}, f, ensure_ascii=False)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> CharTokenizer:
        """Read a file written by `save`; malformed content raises TokenizerError naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read char tokenizer ({e})") from None
        if not isinstance(payload, dict) or payload.get("kind") != "char":
            raise TokenizerError(f"{path}: not a char tokenizer file (expected kind 'char')")
        chars = payload.get("chars")
        if not isinstance(chars, list):
            raise TokenizerError(f"{path}: 'chars' must be a list of characters")
        try:
            return cls(chars)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None
