"""Token automata: a JSON Schema held as a table the compiled decode loop reads.

`serving.grammar` (llguidance) answers a row's mask on the host, one token at a time, so
while such a row runs every decode call is one step. For a *closed* schema -- one that
never admits an arbitrary JSON value and uses only keywords outlines-core holds exactly
(`exact_form`) -- this module builds the schema's token-level
automaton up front instead: one table `next[state, class of token]` (-1: not allowed),
which the decode loop reads every step (`generation.sampler.constrain` and
`follow_grammar`; a batch's automata together: `serving.automaton_batch`). The mask and
the state change stay inside the compiled loop, so constrained rows decode as many steps
per call as free ones.

The automaton comes from outlines-core (the engine of `outlines`: Rust, no framework
dependency): the schema's regular expression over the tokenizer's token bytes, as
llguidance reads them. Why two engines: outlines-core builds the whole automaton at
once, which is fast for a closed schema (the `structured_output` benchmark's: 130 states
in 2 ms) and explodes for an open one (`{"type": "object"}` alone: 1,623 states in 7.8 s,
even over a 256-token vocabulary), while llguidance computes each mask lazily and takes
any schema. So a closed schema whose table fits `MAX_TABLE_CELLS` gets an automaton, and
the others (JSON mode among them) keep llguidance's host masks. llguidance checks every
schema first (its refusals are the 400s). Both engines write only documents the schema
accepts; they can differ in which ones (outlines-core, e.g., never writes a property the
schema does not list, and unrolls a recursive `$ref` to a bounded depth).
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np
from outlines_core import Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema

from deepseek_tf.serving.grammar import WHITESPACE, GrammarVocab

MAX_TABLE_CELLS = 1 << 22  # states x token classes of one automaton: 16 MiB of int32
# outlines-core walks every token from every state of the schema's byte automaton: about
# 40 ns a walk here (293 states x 21,528 tokens in 0.25 s), so this bounds a build to ~3 s
MAX_WALKS = 1 << 26
CACHED_PER_VOCAB = 64  # automata kept per tokenizer, by schema
MAX_ENUM_RANGE = 256  # a bounded integer with at most this many values becomes an enum
# What outlines-core holds exactly (tests/serving/test_token_automaton.py walks each):
# it ignores numeric bounds, `multipleOf`, `minProperties`/`maxProperties` and treats
# `oneOf` as `anyOf`, so a schema using any keyword not named here stays with llguidance.
ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples"}
HONOURED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems",
            "minItems", "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
            "pattern", "format", "minLength", "maxLength", *ANNOTATIONS}  # fmt: skip
FORMATS = {"date", "date-time", "uuid", "email"}  # (its "time" and "uri" write invalid JSON)
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integer_range(schema: dict) -> dict | None:
    """A bounded integer schema as the enum of its values (None: too many, or a bound
    missing); any other schema as it is."""
    if schema.get("type") != "integer" or not any(k in schema for k in _BOUNDS):
        return schema
    lows = [math.ceil(schema["minimum"])] if "minimum" in schema else []
    lows += [math.floor(schema["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in schema else []
    highs = [math.floor(schema["maximum"])] if "maximum" in schema else []
    highs += [math.ceil(schema["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in schema else []
    if not lows or not highs or max(highs) - max(lows) + 1 > MAX_ENUM_RANGE:
        return None
    step = schema.get("multipleOf", 1)
    values = [v for v in range(max(lows), min(highs) + 1) if v % step == 0]
    rest = {k: v for k, v in schema.items() if k in ANNOTATIONS}
    return {**rest, "enum": values} if values else None


def exact_form(schema):
    """`schema` as outlines-core holds it exactly (bounded integers written as enums), or
    None: it admits an arbitrary JSON value somewhere (`{}`, an object without
    `properties` or with `additionalProperties`, an array without `items`: its automaton
    would be all of JSON, see the module doc) or uses a keyword outside `HONOURED`."""
    if schema is False:
        return False
    if not isinstance(schema, dict) or not schema:
        return None
    schema = _integer_range(schema)
    if schema is None or set(schema) - HONOURED:
        return None
    if "format" in schema and schema["format"] not in FORMATS:
        return None
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if "object" in types and (
        "properties" not in schema or schema.get("additionalProperties", False) is not False
    ):
        return None
    if "array" in types and "items" not in schema and "prefixItems" not in schema:
        return None
    out = dict(schema)
    for key in ("items", "additionalProperties"):
        if key in schema:
            out[key] = exact_form(schema[key])
            if out[key] is None:
                return None
    for key in ("anyOf", "prefixItems"):
        if key in schema:
            out[key] = [exact_form(s) for s in schema[key]]
            if any(s is None for s in out[key]):
                return None
    for key in ("properties", "$defs", "definitions"):
        if key in schema:
            out[key] = {name: exact_form(s) for name, s in schema[key].items()}
            if any(s is None for s in out[key].values()):
                return None
    return out


@dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """A schema's documents as token transitions (state 0 is the start).

    Tokens that every state treats alike share a class (a JSON schema over DeepSeek's
    129k-token vocabulary has a few hundred classes: the structural tokens, and "any
    token allowed inside a string"), so the table is states x classes, not x vocabulary.

    Attributes:
        table: `(S, C)` int32: the state after a token of each class, -1 where it is not
            allowed (class 0: tokens never allowed).
        classes: `(V,)` int32: each token's class.
        dead: `(S,)` bool: states no token may leave (the document is complete; a
            vocabulary with an EOS allows it in every complete state instead).
    """

    table: np.ndarray
    classes: np.ndarray
    dead: np.ndarray

    @property
    def states(self) -> int:
        return self.table.shape[0]

    def next_states(self, state: int) -> np.ndarray:
        """`(V,)` int32: the state after each token from `state`, -1 where not allowed."""
        return self.table[state][self.classes]


def _outlines_vocabulary(vocab: GrammarVocab) -> tuple[Vocabulary, int]:
    """The tokenizer's tokens as outlines-core reads them (their bytes, as llguidance
    decodes them; special tokens left out) and the EOS id it is given."""
    engine, eos = vocab.engine, vocab.eos_id if vocab.eos_id is not None else vocab.size
    tokens: dict[bytes, list[int]] = {}
    for i in range(vocab.size):
        if i != eos and not engine.is_special_token(i):
            data = engine.decode_bytes([i])
            if data:
                tokens.setdefault(data, []).append(i)
    return Vocabulary(eos, tokens), eos


def _table(index: Index, vocab: GrammarVocab, eos: int) -> TokenAutomaton:
    edges = index.get_transitions()  # {state: {token: state}}
    start = index.get_initial_state()
    reached = {s for out in edges.values() for s in out.values()} | set(edges) | {start}
    number = {s: i for i, s in enumerate([start, *sorted(reached - {start})])}
    moves: dict[int, dict[int, int]] = {}  # token -> {state: next state}
    for state, out in edges.items():
        for token, after in out.items():
            if token < vocab.size:
                moves.setdefault(token, {})[number[state]] = number[after]
    if eos < vocab.size:  # EOS ends the row (a stop id) from each complete state
        moves[eos] = {number[s]: number[s] for s in index.get_final_states() if s in number}
    columns: dict[tuple, int] = {(): 0}
    classes = np.zeros(vocab.size, np.int32)
    for token, move in moves.items():
        classes[token] = columns.setdefault(tuple(sorted(move.items())), len(columns))
    table = np.full((len(number), len(columns)), -1, np.int32)
    for column, c in columns.items():
        for state, after in column:
            table[state, c] = after
    return TokenAutomaton(table, classes, (table < 0).all(axis=1))


class _Builder:
    """Automata of one tokenizer, by schema (compiling one costs up to MAX_TABLE_CELLS)."""

    _per_vocab: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, vocab: GrammarVocab):
        self.vocab = vocab
        self.outlines, self.eos = _outlines_vocabulary(vocab)
        self.bytes = Vocabulary(0, {bytes([b]): [b + 1] for b in range(256)})  # the probe's
        self.built: dict[str, TokenAutomaton | None] = {}

    @classmethod
    def of(cls, vocab: GrammarVocab) -> _Builder:
        with cls._lock:
            builder = cls._per_vocab.get(vocab)
            if builder is None:
                builder = cls._per_vocab[vocab] = cls(vocab)
            return builder

    def _index(self, schema: dict) -> Index | None:
        """outlines-core's index of `schema` (None: not closed, or past `MAX_WALKS`)."""
        exact = exact_form(schema)
        if exact is None:
            return None
        regex = build_regex_from_schema(json.dumps(exact), WHITESPACE)
        states = len(Index(regex, self.bytes).get_transitions())  # cheap: 256 tokens
        return Index(regex, self.outlines) if states * self.vocab.size <= MAX_WALKS else None

    def build(self, schema: dict) -> TokenAutomaton | None:
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if key in self.built:
                return self.built[key]
        automaton = None
        try:  # any failure (a schema outlines-core cannot hold): llguidance's host masks
            index = self._index(schema)
        except Exception:
            index = None
        if index is not None:
            automaton = _table(index, self.vocab, self.eos)
            if automaton.table.size > MAX_TABLE_CELLS:
                automaton = None
        with self._lock:
            if len(self.built) >= CACHED_PER_VOCAB:
                self.built.pop(next(iter(self.built)))
            self.built[key] = automaton
        return automaton


def build_automaton(schema: dict, vocab: GrammarVocab) -> TokenAutomaton | None:
    """The token automaton of `schema` (already accepted by `grammar.compile_schema`), or
    None for one left to llguidance's host masks (open, or its table too large)."""
    return _Builder.of(vocab).build(schema)


class TableConstraint:
    """An automaton followed on the host, one token at a time: the plain reference of
    the in-loop path (same interface as `grammar.GrammarConstraint`)."""

    def __init__(self, automaton: TokenAutomaton):
        self.automaton, self.state = automaton, 0

    def allowed(self) -> np.ndarray:
        return self.automaton.next_states(self.state) >= 0

    def advance(self, token_id: int) -> None:
        after = int(self.automaton.next_states(self.state)[int(token_id)])
        if after < 0:
            raise ValueError(f"token {token_id} leaves the automaton in state {self.state}")
        self.state = after

    @property
    def done(self) -> bool:
        return bool(self.automaton.dead[self.state])
