"""Structured output: the JSON Schema a reply is held to, from `response_format` or a
forced tool call, checked and compiled before the request is queued.

`response_format`: `{"type": "text"}` (free), `{"type": "json_object"}` (any JSON object)
or OpenAI's `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. A
schema the grammar engine refuses (`serving.grammar`) is a 400 that names it. A closed
schema also gets a token automaton (`serving.token_automaton`) that the decode loop
follows itself; the others are followed on the host, one token per decode call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepseek_tf.serving.api_errors import bad
from deepseek_tf.serving.grammar import (
    GrammarConstraint,
    GrammarError,
    GrammarVocab,
    compile_schema,
)
from deepseek_tf.serving.token_automaton import TableConstraint, TokenAutomaton, build_automaton
from deepseek_tf.serving.tool_calls import ToolSet, forced_schema

ANY_OBJECT = {"type": "object"}


def response_schema(response_format) -> dict | None:
    """The schema `response_format` asks for (None: free text); anything else is a 400."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise bad(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
            "response_format",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad(
            "'response_format.json_schema' must be an object with a 'name' and a 'schema'",
            "response_format",
        )
    schema = spec.get("schema", ANY_OBJECT)
    if not isinstance(schema, dict):
        raise bad(
            "'response_format.json_schema.schema' must be a JSON Schema object", "response_format"
        )
    return schema


def reply_schema(response_format, tools: ToolSet | None) -> tuple[dict | None, str]:
    """`(schema, the field it came from)`: `response_format`'s, or a forced tool call's."""
    schema = response_schema(response_format)
    if tools is None or not tools.forced:
        return schema, "response_format"
    if schema is not None:
        raise bad("give 'response_format' or a forced 'tool_choice', not both", "response_format")
    return forced_schema(tools), "tools"


@dataclass(frozen=True, eq=False)
class ReplyGrammar:
    """A reply's schema compiled for the tokenizer.

    Attributes:
        vocab: the tokenizer's `GrammarVocab`.
        text: llguidance's grammar of the schema.
        automaton: its `TokenAutomaton`, which the decode loop follows (None: the schema is
            open or its table too large; the host follows `text`).
    """

    vocab: GrammarVocab
    text: str
    automaton: TokenAutomaton | None

    def host_constraint(self):
        """A constraint followed on the host, one token per decode call: the automaton's
        when there is one (the in-loop path's plain reference), else llguidance's."""
        if self.automaton is not None:
            return TableConstraint(self.automaton)
        return GrammarConstraint(self.vocab, self.text)


def compile_reply_grammar(schema: dict, tokenizer, param: str) -> ReplyGrammar:
    """The compiled grammar of `schema` for `tokenizer`; a 400 naming `param` when the
    engine refuses the schema or the vocabulary cannot begin a reply under it."""
    if tokenizer is None:
        raise bad("structured output needs the model's tokenizer (token texts)", param)
    vocab = GrammarVocab.for_tokenizer(tokenizer)
    try:
        grammar = compile_schema(schema, vocab)
    except GrammarError as e:
        raise bad(f"'{param}': the JSON Schema is not supported: {e}", param) from None
    first = np.flatnonzero(GrammarConstraint(vocab, grammar).allowed())
    if not any(tokenizer.decode([int(t)]).strip() for t in first):  # whitespace alone
        raise bad(f"'{param}': this model's vocabulary cannot begin such a reply", param)
    return ReplyGrammar(vocab, grammar, build_automaton(schema, vocab))
