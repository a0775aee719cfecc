"""Constrained decoding: a reply held to a JSON Schema, token by token, with llguidance.

`response_format: {"type": "json_schema", ...}` (OpenAI's structured outputs),
`{"type": "json_object"}` (the schema `{"type": "object"}`) and a forced tool call
(`tool_choice` `required` or a named function: `serving.tool_calls.forced_schema`) all
become one `GrammarConstraint`: before each step it answers the mask of tokens that keep
the text a prefix of a document the schema accepts (EOS only once it is complete), and
it follows each token the model picks.

The masks come from llguidance, the grammar engine vLLM and SGLang use: Rust, no
framework dependency, fed the tokenizer's own `tokenizer.json` (a character vocabulary
is given to it as an equivalent byte-level one), about 30-60 microseconds per mask.
It supports the JSON Schema keywords that shape a document -- `type`, `properties`,
`required`, `additionalProperties`, `items`/`prefixItems`, `min`/`maxItems`, `enum`,
`const`, `anyOf`/`oneOf`/`allOf`, `$ref`/`$defs`, `pattern`, `format`, string lengths,
numeric bounds -- and refuses the others (`not`, `if`/`then`, `uniqueItems`,
`contains`, `propertyNames`, `dependentRequired`, ...) with a `GrammarError` naming
them, which the server answers with a 400. Properties are written in the schema's order.
"""

from __future__ import annotations

import threading
import weakref

import llguidance.numpy as llnp
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer, decoders, models

# Whitespace between JSON tokens: at most one space (outlines' choice; a model left free to
# write whitespace loops on it -- an untrained one fills its whole budget with newlines).
WHITESPACE = r"[ ]?"
END_TOKEN = "<|grammar_end|>"  # the end llguidance needs when the vocabulary has no EOS


class GrammarError(ValueError):
    """A schema the engine cannot hold a reply to (the message says why)."""


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _char_vocabulary_json(tokenizer) -> str:
    """A `tokenizer.json` with `tokenizer`'s characters as byte-level tokens (same ids)
    and an end token after them: llguidance reads the token bytes from it."""
    table = _byte_chars()
    vocab = {"".join(table[b] for b in c.encode("utf-8")): i for i, c in enumerate(tokenizer.chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([END_TOKEN])
    return tok.to_str()


class GrammarVocab:
    """A tokenizer as llguidance sees it (built once per tokenizer: `for_tokenizer`).

    Attributes:
        engine: the `LLTokenizer`.
        size: ids the tokenizer can decode (masks are this long).
        eos_id: the tokenizer's EOS id, or None (the engine then ends on an id of its own,
            `size`, that is never sampled: the reply ends when nothing else is allowed).
    """

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, tokenizer):
        self.size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        if getattr(tokenizer, "hugging_face_format", False):
            source, end = tokenizer.hf_tokenizer.to_str(), self.eos_id
        else:
            source, end = _char_vocabulary_json(tokenizer), self.size
        if end is None:  # a BPE vocabulary without an EOS token
            tok = Tokenizer.from_str(source)
            tok.add_special_tokens([END_TOKEN])
            source, end = tok.to_str(), tok.token_to_id(END_TOKEN)
        self.engine = LLTokenizer(source, eos_token=end)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> GrammarVocab:
        with cls._lock:
            vocab = cls._cache.get(tokenizer)
            if vocab is None:
                vocab = cls._cache[tokenizer] = cls(tokenizer)
            return vocab


def compile_schema(schema: dict, vocab: GrammarVocab) -> str:
    """The llguidance grammar of a JSON Schema; raises GrammarError for one it refuses."""
    if not isinstance(schema, dict):
        raise GrammarError("the schema must be a JSON object")
    grammar = LLMatcher.grammar_from_json_schema(
        schema, overrides={"whitespace_pattern": WHITESPACE}
    )
    problem = LLMatcher.validate_grammar(grammar, vocab.engine)
    if problem:
        raise GrammarError(problem)
    return grammar


class GrammarConstraint:
    """One reply held to a schema.

    Args:
        vocab: the tokenizer's `GrammarVocab`.
        grammar: from `compile_schema`.

    Examples:
        constraint = GrammarConstraint.for_schema(tokenizer, {"type": "object"})
        allowed = constraint.allowed()  # (V,) bool
        constraint.advance(token_id)
    """

    def __init__(self, vocab: GrammarVocab, grammar: str):
        self.vocab = vocab
        self.matcher = LLMatcher(vocab.engine, grammar, log_level=0)
        self._bits = llnp.allocate_token_bitmask(1, vocab.engine.vocab_size)
        self._allowed: np.ndarray | None = None

    @classmethod
    def for_schema(cls, tokenizer, schema: dict) -> GrammarConstraint:
        vocab = GrammarVocab.for_tokenizer(tokenizer)
        return cls(vocab, compile_schema(schema, vocab))

    def allowed(self) -> np.ndarray:
        """`(V,)` bool: the tokens that may come next (EOS once the document is complete)."""
        if self._allowed is None:
            llnp.fill_next_token_bitmask(self.matcher, self._bits)
            bits = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")
            self._allowed = bits[: self.vocab.size].astype(bool)
        return self._allowed

    def advance(self, token_id: int) -> None:
        """Follows the token the model chose; ValueError if the grammar does not allow it."""
        self._allowed = None
        if not self.matcher.consume_token(int(token_id)):
            raise ValueError(f"token {token_id} leaves the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The document is complete and nothing but the end may follow."""
        if self.matcher.is_stopped():
            return True
        return self.matcher.is_accepting() and not self.allowed().any()
