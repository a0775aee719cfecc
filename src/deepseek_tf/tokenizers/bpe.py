"""Byte-level BPE tokenizer backed by Hugging Face `tokenizers` (GPT-2 style)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tensorflow as tf
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from deepseek_tf.errors import TokenizerError
from deepseek_tf.tokenizers.base import BPE_FILE, EOS_TOKEN, Tokenizer

MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-text token


class BPETokenizer(Tokenizer):
    """Byte-level BPE: every byte is a symbol, so any Unicode text round-trips exactly.

    Args:
        hf_tokenizer: a `tokenizers.Tokenizer` (ByteLevel pre-tokenizer and decoder).
    """

    kind = "bpe"
    file_name = BPE_FILE

    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        self._tok = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train in memory on `texts` up to `vocab_size` ids (fewer if merges run out)."""
        if vocab_size < MIN_BPE_VOCAB:
            raise TokenizerError(
                f"bpe vocab_size {vocab_size} is below {MIN_BPE_VOCAB} "
                "(256 byte symbols + <|endoftext|>)"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
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
        return self._tok.token_to_id(EOS_TOKEN)

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

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        """Read a Hugging Face `tokenizer.json`; unreadable files raise TokenizerError."""
        try:
            return cls(HFTokenizer.from_file(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot read tokenizer ({e})") from None
