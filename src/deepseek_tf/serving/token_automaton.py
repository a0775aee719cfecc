"""Token automata: a JSON Schema held as a table the compiled decode loop reads.

`serving.grammar` (llguidance) answers a row's mask on the host, one token at a time, so
while such a row runs every decode call is one step. For a *closed* schema -- one that
never admits an arbitrary JSON value -- this module builds the schema's token-level
automaton up front instead: one dense table `next[state, token]` (-1: the token is not
allowed), which the decode loop reads every step (`generation.sampler.constrain` and
`follow_grammar`). The mask and the state change stay inside the compiled loop, so
constrained rows decode as many steps per call as free ones.

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
import tensorflow as tf
from outlines_core import Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema

from deepseek_tf.serving.grammar import WHITESPACE, GrammarVocab

MAX_TABLE_CELLS = 1 << 24  # states x vocabulary of one automaton: 64 MiB of int32
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

    Attributes:
        table: `(S, V)` int32: the state after each token, -1 where it is not allowed.
        dead: `(S,)` bool: states no token may leave (the document is complete; a
            vocabulary with an EOS allows it in every complete state instead).
    """

    table: np.ndarray
    dead: np.ndarray

    @property
    def states(self) -> int:
        return self.table.shape[0]


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
    order = [start, *sorted(reached - {start})]
    number = {s: i for i, s in enumerate(order)}
    table = np.full((len(order), vocab.size), -1, np.int32)
    for state, out in edges.items():
        row = table[number[state]]
        for token, after in out.items():
            if token < vocab.size:
                row[token] = number[after]
    for state in index.get_final_states():
        if state in number and eos < vocab.size:
            table[number[state], eos] = number[state]  # EOS ends the row (a stop id)
    return TokenAutomaton(table, (table < 0).all(axis=1))


class _Builder:
    """Automata of one tokenizer, by schema (compiling one costs up to MAX_TABLE_CELLS)."""

    _per_vocab: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, vocab: GrammarVocab):
        self.vocab = vocab
        self.outlines, self.eos = _outlines_vocabulary(vocab)
        self.built: dict[str, TokenAutomaton | None] = {}

    @classmethod
    def of(cls, vocab: GrammarVocab) -> _Builder:
        with cls._lock:
            builder = cls._per_vocab.get(vocab)
            if builder is None:
                builder = cls._per_vocab[vocab] = cls(vocab)
            return builder

    def build(self, schema: dict) -> TokenAutomaton | None:
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if key in self.built:
                return self.built[key]
        automaton, exact = None, exact_form(schema)
        if exact is not None:
            try:
                regex = build_regex_from_schema(json.dumps(exact), WHITESPACE)
                index = Index(regex, self.outlines)
            except (ValueError, TypeError, RuntimeError):  # a schema outlines cannot hold
                index = None
            if index is not None and len(index.get_transitions()) * self.vocab.size <= (
                MAX_TABLE_CELLS
            ):
                automaton = _table(index, self.vocab, self.eos)
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
        return self.automaton.table[self.state] >= 0

    def advance(self, token_id: int) -> None:
        after = int(self.automaton.table[self.state, int(token_id)])
        if after < 0:
            raise ValueError(f"token {token_id} leaves the automaton in state {self.state}")
        self.state = after

    @property
    def done(self) -> bool:
        return bool(self.automaton.dead[self.state])


class AutomatonBatch:
    """The automata of a batch's rows as one table for the decode call.

    State 0 is a free row's (every token allowed, staying in 0); each distinct automaton's
    states follow at an offset. A row keeps its own automaton's state between calls; the
    table is rebuilt when the set of automata changes, its rows padded to a power of two
    (a new size is a new compiled program).

    Args:
        slots: rows in the batch.
        width: the model's vocabulary (ids past the tokenizer's are never allowed).

    Examples:
        batch = AutomatonBatch(slots=16, width=model.vocab_size)
        batch.seat(3, automaton)
        table, dead, states = batch.call_args()  # into `SlotCache.advance(grammar=...)`
        batch.update(states_after)  # what the call returned
    """

    MIN_STATES = 64

    def __init__(self, slots: int, width: int):
        self.width = width
        self.rows: list[TokenAutomaton | None] = [None] * slots
        self.local = np.zeros(slots, np.int32)
        self._members: tuple = ()
        self._offsets: dict[int, int] = {}
        self._tensors = None

    def seat(self, slot: int, automaton: TokenAutomaton | None) -> None:
        self.rows[slot], self.local[slot] = automaton, 0

    @property
    def active(self) -> bool:
        return any(a is not None for a in self.rows)

    def dead(self, slot: int) -> bool:
        """Whether the row's document is complete with nothing allowed after it."""
        automaton = self.rows[slot]
        return automaton is not None and bool(automaton.dead[self.local[slot]])

    def _build(self, members: tuple) -> None:
        size = 1 + sum(a.states for a in members)
        size = max(self.MIN_STATES, 1 << (size - 1).bit_length())
        table = np.full((size, self.width), -1, np.int32)
        table[0] = 0
        dead = np.zeros(size, bool)
        offset, self._offsets = 1, {}
        for a in members:
            rows, vocab = a.table.shape
            table[offset : offset + rows, :vocab] = np.where(a.table >= 0, a.table + offset, -1)
            dead[offset : offset + rows] = a.dead
            self._offsets[id(a)], offset = offset, offset + rows
        self._members, self._tensors = members, (tf.constant(table), tf.constant(dead))

    def call_args(self):
        """`(table (S, V) int32, dead (S,) bool, states (B,) int32)` for the call."""
        members = tuple({id(a): a for a in self.rows if a is not None}.values())
        if tuple(map(id, members)) != tuple(map(id, self._members)):
            self._build(members)
        states = [0 if a is None else self._offsets[id(a)] + int(s)
                  for a, s in zip(self.rows, self.local)]  # fmt: skip
        return (*self._tensors, tf.constant(states, tf.int32))

    def update(self, states) -> None:
        """Takes each row's state after a call (`(B,)` in the call's numbering)."""
        for slot, automaton in enumerate(self.rows):
            if automaton is not None:
                self.local[slot] = int(states[slot]) - self._offsets[id(automaton)]
