"""JSON mode's token mask: exactly the prefixes of valid JSON objects, checked against
`json.loads` (a prefix accepted must complete to an object; a text `json.loads` reads as an
object must be accepted and complete)."""

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepseek_tf.serving.json_constraint import (
    DONE,
    INITIAL,
    JsonConstraint,
    closing,
    is_object_prefix,
    token_texts,
    walk,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=5), values, max_size=5)
dump_options = st.sampled_from(
    [{}, {"indent": 2}, {"ensure_ascii": False}, {"separators": (",", ":")}, {"indent": "\t"}]
)
ALPHABET = '{}[]":,0123456789-+.eEtrufalsn \n\t\\u/bxé\u2028\x01A'


def _no_constants(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def loads_object(text: str) -> bool:
    """`json.loads` reads `text` as an object (NaN and Infinity refused, as RFC 8259 does)."""
    try:
        return isinstance(json.loads(text, parse_constant=_no_constants), dict)
    except (ValueError, RecursionError):
        return False


def check_against_json(text: str) -> None:
    """The automaton and `json.loads` agree on `text`."""
    state = walk(INITIAL, text)
    if loads_object(text):
        assert state is not None and state[0] == DONE, text
    if state is None:
        return
    completed = text + closing(state)
    assert loads_object(completed), (text, completed)
    assert (state[0] == DONE) == loads_object(text), text


@settings(max_examples=200, deadline=None)
@given(objects, dump_options, st.sampled_from(["", " ", "\n", " \r\n\t"]))
def test_every_prefix_of_a_valid_object_is_accepted(obj, options, pad):
    text = pad + json.dumps(obj, **options) + pad
    state = INITIAL
    checked = set(np.linspace(0, len(text) - 1, 40).astype(int).tolist())
    for i, ch in enumerate(text):
        state = walk(state, ch)
        assert state is not None, (text, i)
        if i in checked:
            check_against_json(text[: i + 1])
    assert state[0] == DONE


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=30))
def test_random_strings_agree_with_json_loads(text):
    check_against_json(text)
    check_against_json("{" + text)
    check_against_json('{"k": ' + text)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(objects, st.data())
def test_mutated_objects_agree_with_json_loads(obj, data):
    text = json.dumps(obj)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(text)))
        kind = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        ch = data.draw(st.sampled_from(ALPHABET))
        if kind == "insert":
            text = text[:pos] + ch + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + 1 :]
        else:
            text = text[:pos] + ch + text[pos + 1 :]
    check_against_json(text)
    for cut in range(len(text)):
        check_against_json(text[:cut])


@pytest.mark.parametrize(
    "text,ok",
    [
        ('{"a": -0.5e-3, "b": 1E+2, "c": 0, "d": -12.25}', True),
        ('{"a": [[], [[1, 2], {"b": [true, false, null]}], ""]}', True),
        ('{"\\u00e9\\n\\"\\\\\\/\\b\\f\\r\\t": "\\uD83D\\uDE00 é 😀"}', True),
        ("{}", True),
        (' \n{ "a" : { } } \t', True),
        ('{"a": 01}', False),
        ('{"a": 1.}', False),
        ('{"a": .5}', False),
        ('{"a": +1}', False),
        ('{"a": 1e}', False),
        ('{"a": -}', False),
        ('{"a": "\\x"}', False),
        ('{"a": "\\u12G4"}', False),
        ('{"a": "tab\there"}', False),  # a raw control character inside a string
        ('{"a": [1,]}', False),
        ('{"a": 1,}', False),
        ('{"a" 1}', False),
        ("{a: 1}", False),
        ("{'a': 1}", False),
        ('{"a": tru}', False),
        ('{"a": True}', False),
        ('{"a": NaN}', False),
        ("[1, 2]", False),  # the top level must be an object
        ('"text"', False),
        ("{}{}", False),
        ("{}}", False),
    ],
)
def test_known_cases(text, ok):
    state = walk(INITIAL, text)
    assert (state is not None and state[0] == DONE) == ok == loads_object(text)
    check_against_json(text)


def test_prefixes_that_can_still_complete():
    for text in ['{"a": -', '{"a": 1.', '{"a": 1e', '{"a": 1e-', '{"a": "\\u00', '{"a": [', "  "]:
        assert is_object_prefix(text)
        assert loads_object(text + closing(walk(INITIAL, text)))


def brute_mask(texts, eos_id, prefix, max_ws=None):
    state = walk(INITIAL, prefix, max_ws)
    want = np.zeros(len(texts), bool)
    for i, t in enumerate(texts):
        if i == eos_id:
            want[i] = state[0] == DONE
        elif t and "\ufffd" not in t and state[0] != DONE:
            want[i] = walk(state, t, max_ws) is not None
    if state[0] == DONE and eos_id is None:
        want = np.asarray([bool(t) and set(t) <= set(" \t\n\r") for t in texts])
    return want


def random_vocab(rng: random.Random, size: int) -> list[str]:
    pieces = list(ALPHABET) + ['{"', '":', '", "', "true", "null", "12", "e-", '"}', "]}", "\\u"]
    pieces += ["", "\ufffd", "a\ufffd", "  ", "\n  ", "hello", 'say "hi"', "}, {", "[{", "0.5"]
    vocab = list(dict.fromkeys(pieces))
    while len(vocab) < size:
        vocab.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 3))))
    return [*vocab, "<eos>"]


@pytest.mark.parametrize("seed", range(4))
def test_masks_equal_brute_force_along_random_generations(seed):
    rng = random.Random(seed)
    texts = random_vocab(rng, 300)
    eos = len(texts) - 1
    for max_ws in (None, 3):
        constraint = JsonConstraint(texts, eos, max_ws=max_ws)
        for _ in range(60):
            mask = constraint.allowed()
            np.testing.assert_array_equal(mask, brute_mask(texts, eos, constraint.text, max_ws))
            assert not mask[texts.index("")] and not mask[texts.index("\ufffd")]
            if not mask.any():
                break
            token = rng.choice(np.flatnonzero(mask).tolist())
            fork = constraint.copy()
            constraint.advance(token)
            assert fork.text != constraint.text or token == eos  # the copy did not move
            if token == eos:
                assert loads_object(constraint.text)
                break
        assert is_object_prefix(constraint.text)
        assert loads_object(constraint.text + constraint.closing())


def test_eos_only_when_complete_and_bad_tokens_refused():
    texts = ["{", "}", '"k"', ":", "7", " ", "x", "<eos>"]
    c = JsonConstraint(texts, eos_id=7)
    assert not c.allowed()[7]
    with pytest.raises(ValueError, match="EOS"):
        c.advance(7)
    with pytest.raises(ValueError, match="breaks"):
        c.advance(6)
    for t in (5, 0, 2, 5, 3, 4, 1):
        c.advance(t)
    assert c.done and loads_object(c.text)
    assert np.flatnonzero(c.allowed()).tolist() == [7]
    assert not c.allowed().flags.writeable


def test_whitespace_is_capped():
    c = JsonConstraint([" ", "{", "}"], None, max_ws=2)
    c.advance(0)
    c.advance(0)
    assert c.allowed().tolist() == [False, True, False]
    assert JsonConstraint([" ", "{"], None, max_ws=None).allowed().tolist() == [True, True]


def test_a_character_vocabulary_without_braces_has_nothing_to_offer(loaded):
    _, tok = loaded  # Shakespeare's characters: no "{"
    texts = token_texts(tok)
    assert texts is token_texts(tok)  # cached per tokenizer
    assert texts == [tok.decode([i]) for i in range(tok.vocab_size)]
    assert "{" not in texts
    c = JsonConstraint.for_tokenizer(tok, max_ws=1)
    assert [texts[i] for i in np.flatnonzero(c.allowed())] == ["\n", " "]  # leading space
    c.advance(texts.index(" "))
    assert not c.allowed().any()  # a dead end: the caller ends the request


def test_byte_level_bpe_fragments_are_never_allowed():
    from deepseek_tf.tokenizers import train_tokenizer

    tok = train_tokenizer(
        "bpe",
        texts=['{"name": "Zürich", "temp": -3.5e1, "ok": [true, null]}\n'] * 30,
        vocab_size=300,
    )
    texts = token_texts(tok)
    c = JsonConstraint.for_tokenizer(tok)
    fragments = [i for i, t in enumerate(texts) if "\ufffd" in t]
    assert fragments  # partial UTF-8 bytes of "ü" decode alone to U+FFFD
    c.advance(texts.index("{"))
    c.advance(texts.index('"'))
    mask = c.allowed()
    assert not mask[fragments].any()
    inside = [
        i
        for i, t in enumerate(texts)
        if t and not set(t) & {"\ufffd", '"', "\\"} and all(ch >= " " for ch in t)
        if i != tok.eos_id
    ]
    assert mask[inside].all()  # any plain text continues a string


def test_masks_are_cached_per_state():
    texts = random_vocab(random.Random(9), 200)
    a, b = JsonConstraint(texts, len(texts) - 1), JsonConstraint(texts, len(texts) - 1)
    assert a.vocab is b.vocab and a.allowed() is b.allowed()


@given(st.text(alphabet=ALPHABET, max_size=12))
@settings(max_examples=100, deadline=None)
def test_walk_is_step_by_step(text):
    text = "{" + text
    whole = walk(INITIAL, text)
    state = INITIAL
    for ch in text:
        state = walk(state, ch)
    assert state == whole
    assert is_object_prefix(text) == (whole is not None)
