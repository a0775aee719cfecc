"""Closed schemas as token automata (`serving.token_automaton`): which schemas get one, that
every document an automaton can write validates, that its table is outlines-core's index,
and that the scheduler following it inside the decode loop gives the tokens of its plain
reference (the same automaton followed on the host, one token per call)."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from outlines_core import Index
from outlines_core.json_schema import build_regex_from_schema

from deepseek_tf.models.builder import build_model
from deepseek_tf.serving.grammar import WHITESPACE, GrammarVocab
from deepseek_tf.serving.protocol import GenRequest
from deepseek_tf.serving.scheduler import ContinuousScheduler
from deepseek_tf.serving.structured import ANY_OBJECT, compile_reply_grammar
from deepseek_tf.serving.token_automaton import (
    MAX_ENUM_RANGE,
    TableConstraint,
    _Builder,
    build_automaton,
    exact_form,
)
from deepseek_tf.tokenizers import CharTokenizer, load_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizers"))
from deepseek_style import write_deepseek_tokenizer  # noqa: E402

jsonschema = pytest.importorskip("jsonschema")


def obj(required=True, **properties):
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": list(properties) if required else []}  # fmt: skip


REPORT = obj(unit={"enum": ["celsius", "fahrenheit"]}, ok={"type": "boolean"},
             days={"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                   "minItems": 1, "maxItems": 2})  # fmt: skip
CLOSED = {
    "report": REPORT,
    "bounded integers": obj(
        a={"type": "integer", "exclusiveMinimum": 2.5, "maximum": 7},
        b={"type": "integer", "minimum": -3, "maximum": 30, "multipleOf": 4},
    ),  # fmt: skip
    "strings": obj(
        s={"type": "string", "minLength": 1, "maxLength": 3},
        p={"type": "string", "pattern": "^[ab]{2}$"},
    ),  # fmt: skip
    "optional and nullable": obj(False, n={"type": ["integer", "null"]}, b={"type": "boolean"}),
    "anyOf, const, tuple": obj(
        x={"anyOf": [{"const": 1}, {"type": "boolean"}]},
        t={
            "type": "array",
            "prefixItems": [{"type": "boolean"}, {"enum": ["u", "v"]}],
            "items": False,
        },
    ),  # fmt: skip
    "$ref": {
        **obj(p={"$ref": "#/$defs/point"}),
        "$defs": {"point": obj(x={"type": "integer", "minimum": 0, "maximum": 3})},
    },
    "format": obj(d={"type": "string", "format": "date"}),
}
OPEN = {
    "json mode": ANY_OBJECT,
    "any value": obj(v={}),
    "extra properties": {**obj(a={"type": "boolean"}), "additionalProperties": True},
    "array of anything": obj(a={"type": "array"}),
    "number bounds (ignored by outlines-core)": {"type": "number", "minimum": 0, "maximum": 1},
    "unbounded integer range": {"type": "integer", "minimum": 0},
    "too wide an integer range": {"type": "integer", "minimum": 0, "maximum": MAX_ENUM_RANGE},
    "oneOf (outlines-core: anyOf)": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "minProperties": {**obj(False, a={"type": "boolean"}), "minProperties": 1},
    "format uri": {"type": "string", "format": "uri"},
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_deepseek_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return GrammarVocab.for_tokenizer(tokenizer)


def test_bounded_integers_become_enums_and_open_schemas_get_none():
    assert exact_form(REPORT)["properties"]["days"]["items"] == {"enum": list(range(10))}
    bounded = exact_form(CLOSED["bounded integers"])["properties"]
    assert bounded["a"]["enum"] == [3, 4, 5, 6, 7]
    assert bounded["b"]["enum"] == [0, 4, 8, 12, 16, 20, 24, 28]
    for schema in OPEN.values():
        assert exact_form(schema) is None, schema


def _walk(automaton, rng, eos, limit=300):
    """Random allowed tokens until the end (an EOS, a dead state) -> tokens, or None when
    `limit` runs out first."""
    constraint, tokens = TableConstraint(automaton), []
    for _ in range(limit):
        allowed = np.flatnonzero(constraint.allowed())
        if constraint.done or allowed.size == 0:
            return tokens
        token = int(rng.choice(allowed))
        if token == eos:
            return tokens
        constraint.advance(token)
        tokens.append(token)
    return None


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_every_document_an_automaton_writes_validates(name, tokenizer, vocab):
    schema, rng = CLOSED[name], np.random.default_rng(7)
    char = CharTokenizer(sorted(set(json.dumps(schema) + ' {}[]:,"0123456789-truefalsn')))
    for tok, eos in ((tokenizer, tokenizer.eos_id), (char, None)):  # with an EOS, without one
        automaton = build_automaton(schema, GrammarVocab.for_tokenizer(tok))
        assert automaton is not None and automaton.classes.shape == (tok.vocab_size,)
        documents = [_walk(automaton, rng, eos) for _ in range(40)]
        documents = [d for d in documents if d is not None]
        assert len(documents) >= 30  # most walks end
        for tokens in documents:
            jsonschema.validate(json.loads(tok.decode(tokens)), schema)


def test_open_schemas_have_no_automaton_and_refused_ones_never_reach_it(vocab):
    for schema in OPEN.values():
        assert build_automaton(schema, vocab) is None


def test_a_schema_too_large_to_build_stays_on_host_masks(vocab, monkeypatch):
    """States x vocabulary past `MAX_WALKS` (the build's cost): no automaton."""
    from deepseek_tf.serving import token_automaton

    long = obj(s={"type": "string", "maxLength": 40})  # ~40 states
    monkeypatch.setattr(token_automaton, "MAX_WALKS", 10 * vocab.size)
    assert build_automaton(long, vocab) is None
    monkeypatch.setattr(token_automaton, "MAX_WALKS", 1000 * vocab.size)
    assert build_automaton({**long, "title": "uncached"}, vocab) is not None


def test_the_table_is_outlines_cores_index(vocab):
    """Along a walk, the tokens each state allows and where they lead are the index's,
    with far fewer token classes than tokens."""
    schema = CLOSED["strings"]
    automaton = build_automaton(schema, vocab)
    assert automaton.table.shape[1] < vocab.size / 4
    builder = _Builder.of(vocab)
    index = Index(build_regex_from_schema(json.dumps(exact_form(schema)), WHITESPACE),
                  builder.outlines)  # fmt: skip
    state, local, rng = index.get_initial_state(), 0, np.random.default_rng(3)
    for _ in range(12):
        expected = {t for t in index.get_allowed_tokens(state) if t < vocab.size}
        after = automaton.next_states(local)  # (V,)
        assert set(np.flatnonzero(after >= 0)) == expected
        choices = sorted(expected - {vocab.eos_id})
        if not choices:
            break
        token = int(rng.choice(choices))
        state, local = index.get_next_state(state, token), int(after[token])


def _run(scheduler, requests):
    """Each request's `(tokens, finish_reason)`, and the decode calls it took."""
    calls, jobs = scheduler.decode_calls, [scheduler.submit(r) for r in requests]
    deadline = time.monotonic() + 300
    while not all(j.finished for j in jobs):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.01)
    return [(j.tokens, j.finish_reason) for j in jobs], scheduler.decode_calls - calls


def test_in_loop_automata_give_the_host_references_tokens(tiny_config, tokenizer):
    """Two closed schemas and a free row, then JSON mode (llguidance, host masks) beside a
    closed schema, greedy and sampled: the same tokens with the automata followed in the
    decode loop as on the host; without JSON mode, several steps per call in the loop.
    Traced, not XLA-compiled, to keep it quick: the XLA path of the same step serves the
    closed schemas of `test_json_mode.py`, whose replies are validated there."""
    import dataclasses

    config = dataclasses.replace(tiny_config, model=dataclasses.replace(
        tiny_config.model, vocab_size=tokenizer.vocab_size, max_seq_len=64))  # fmt: skip
    model = build_model(config, seed=4)
    prompt = tokenizer.encode("What is the weather?")

    def ask(schema, temperature, seed):
        grammar = None if schema is None else compile_reply_grammar(schema, tokenizer, "rf")
        return GenRequest("completion", "m", None, prompt, max_tokens=40, seed=seed,
                          temperature=temperature, grammar=grammar)  # fmt: skip

    closed = [ask(REPORT, 0.0, 1), ask(CLOSED["anyOf, const, tuple"], 0.9, 2), ask(None, 0.8, 3)]
    mixed = [ask(ANY_OBJECT, 0.0, 5), ask(REPORT, 0.7, 6)]
    assert closed[1].grammar.automaton is not None and mixed[0].grammar.automaton is None
    schedulers = [ContinuousScheduler(model, tokenizer, max_batch=4, step_ms=40, warm_up=False,
                                      jit_compile=False,
                                      in_loop_grammar=in_loop).start()
                  for in_loop in (True, False)]  # fmt: skip
    try:
        (loop, loop_calls), (host, host_calls) = (_run(s, closed) for s in schedulers)
        assert loop == host and loop_calls < host_calls / 2
        schemas = (REPORT, CLOSED["anyOf, const, tuple"])
        complete = [(t, s) for (t, reason), s in zip(loop, schemas) if reason == "stop"]
        assert complete  # (a reply cut by max_tokens is not a document)
        for tokens, schema in complete:
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
        assert _run(schedulers[0], mixed)[0] == _run(schedulers[1], mixed)[0]
    finally:
        for s in schedulers:
            s.stop()
