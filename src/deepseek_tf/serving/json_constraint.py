"""JSON mode: which tokens keep a generation a valid prefix of one JSON object.

`response_format: {"type": "json_object"}` asks for output that parses as a JSON object
(RFC 8259; the top level an object, whitespace allowed). `JsonConstraint` follows the
generated text character by character through a pushdown automaton (a state is an
immutable tuple: the mode, the stack of open containers as a string of "o"/"a", a
mode-specific detail and the count of consecutive whitespace characters) and answers,
before each step, the mask of tokens whose text keeps the text a prefix of a valid
object; EOS only once the object is closed.

Masks are computed over the vocabulary's token texts sorted once per tokenizer
(`JsonVocab`): a token whose text shares a prefix with the previous one resumes from that
prefix's state, and a dead prefix skips every token that starts with it (a bisection).
Inside a string, tokens without `"`, `\\` or control characters never change the state:
they are allowed by a precomputed mask and only the others are walked. Masks are cached
per state (states repeat: most of a JSON text is string content).
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections import OrderedDict

import numpy as np

# modes
START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER, DONE = range(8)
STR, ESC, HEX, LIT = 8, 9, 10, 11
MINUS, ZERO, INT, DOT, FRAC, E, ESIGN, EXP = range(12, 20)
WS = frozenset(" \t\n\r")
HEXDIGITS = frozenset("0123456789abcdefABCDEF")
DIGITS = frozenset("0123456789")
ESCAPES = frozenset('"\\/bfnrt')
WS_MODES = frozenset((START, OBJ_FIRST, OBJ_KEY, COLON, VALUE, ARR_FIRST, AFTER, DONE))
NUMBER_ENDS = frozenset((ZERO, INT, FRAC, EXP))  # a number may end here
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
DIGIT_NEXT = {INT: INT, DOT: FRAC, FRAC: FRAC, E: EXP, ESIGN: EXP, EXP: EXP}
TOP = "\U0010ffff"  # sorts after every character a token text holds
# Whitespace outside strings, most characters in a row: a newline and an indentation 7 deep
# by two spaces; a model left free to write whitespace can loop on it (outlines allows one
# space, llama.cpp's JSON grammar a bounded run).
MAX_WS = 16

State = tuple  # (mode, stack, detail, whitespace run)
INITIAL: State = (START, "", 0, 0)


def _close(stack: str) -> State:
    rest = stack[:-1]
    return (AFTER, rest, 0, 0) if rest else (DONE, "", 0, 0)


def step(state: State, ch: str, max_ws: int | None = None) -> State | None:
    """The state after character `ch`, or None when no JSON object starts with the text."""
    mode, stack, detail, ws = state
    if mode == STR:
        if ch == '"':
            return (COLON, stack, 0, 0) if detail else (AFTER, stack, 0, 0)
        if ch == "\\":
            return (ESC, stack, detail, 0)
        return None if ch < " " else state
    if mode in NUMBER_ENDS or mode in (MINUS, DOT, E, ESIGN):
        if ch in DIGITS:
            if mode == ZERO:
                return None  # no leading zeros
            if mode == MINUS:
                return (ZERO if ch == "0" else INT, stack, 0, 0)
            return (DIGIT_NEXT[mode], stack, 0, 0)
        if ch == "." and mode in (ZERO, INT):
            return (DOT, stack, 0, 0)
        if ch in "eE" and mode in (ZERO, INT, FRAC):
            return (E, stack, 0, 0)
        if ch in "+-" and mode == E:
            return (ESIGN, stack, 0, 0)
        if mode not in NUMBER_ENDS:
            return None
        return step((AFTER, stack, 0, 0), ch, max_ws)  # the number ended before `ch`
    if mode in WS_MODES and ch in WS:
        return None if max_ws is not None and ws >= max_ws else (mode, stack, detail, ws + 1)
    if mode == ESC:
        if ch in ESCAPES:
            return (STR, stack, detail, 0)
        return (HEX, stack, detail, 0) if ch == "u" else None
    if mode == HEX:
        if ch not in HEXDIGITS:
            return None
        key, count = detail & 1, (detail >> 1) + 1
        return (STR, stack, key, 0) if count == 4 else (HEX, stack, key | count << 1, 0)
    if mode == LIT:
        if ch != detail[0]:
            return None
        return (AFTER, stack, 0, 0) if len(detail) == 1 else (LIT, stack, detail[1:], 0)
    if mode == START:
        return (OBJ_FIRST, "o", 0, 0) if ch == "{" else None
    if mode in (OBJ_FIRST, OBJ_KEY):
        if ch == '"':
            return (STR, stack, 1, 0)
        return _close(stack) if ch == "}" and mode == OBJ_FIRST else None
    if mode == COLON:
        return (VALUE, stack, 0, 0) if ch == ":" else None
    if mode in (VALUE, ARR_FIRST):
        if ch == '"':
            return (STR, stack, 0, 0)
        if ch == "{":
            return (OBJ_FIRST, stack + "o", 0, 0)
        if ch == "[":
            return (ARR_FIRST, stack + "a", 0, 0)
        if ch == "-":
            return (MINUS, stack, 0, 0)
        if ch in DIGITS:
            return (ZERO if ch == "0" else INT, stack, 0, 0)
        if ch in LITERALS:
            return (LIT, stack, LITERALS[ch], 0)
        return _close(stack) if ch == "]" and mode == ARR_FIRST else None
    if mode == AFTER:
        top = stack[-1]
        if ch == ",":
            return (OBJ_KEY, stack, 0, 0) if top == "o" else (VALUE, stack, 0, 0)
        return _close(stack) if ch == ("}" if top == "o" else "]") else None
    return None  # DONE: only whitespace


def walk(state: State | None, text: str, max_ws: int | None = None) -> State | None:
    """The state after all of `text` (None once a character is refused)."""
    for ch in text:
        if state is None:
            return None
        state = step(state, ch, max_ws)
    return state


def closing(state: State) -> str:
    """The shortest text that completes the object from `state` (empty once done)."""
    out = []
    while state[0] != DONE:
        mode, stack = state[0], state[1]
        if mode in (AFTER, *NUMBER_ENDS):
            ch = "}" if stack[-1] == "o" else "]"
        elif mode == LIT:
            ch = state[2][0]
        else:
            ch = {START: "{", OBJ_FIRST: "}", OBJ_KEY: '"', COLON: ":", ARR_FIRST: "]",
                  STR: '"', ESC: "n"}.get(mode, "0")  # fmt: skip
        out.append(ch)
        state = step(state, ch)
    return "".join(out)


def _sorted_view(texts: list[str], index: np.ndarray):
    """`(texts, ids, lcp)` of `index` sorted by text; `lcp[i]`: the prefix token i shares
    with token i - 1."""
    order = sorted(index.tolist(), key=texts.__getitem__)
    sorted_texts = [texts[i] for i in order]
    lcp = [0] * len(order)
    for i in range(1, len(order)):
        a, b = sorted_texts[i - 1], sorted_texts[i]
        n = min(len(a), len(b))
        k = 0
        while k < n and a[k] == b[k]:
            k += 1
        lcp[i] = k
    return sorted_texts, np.asarray(order, np.int64), lcp


class JsonVocab:
    """A vocabulary's token texts indexed for `JsonConstraint` (built once per tokenizer).

    Args:
        token_texts: the text of each token id decoded alone.
        eos_id: the end-of-sequence id (allowed once the object is complete), or None.
        cache_size: masks kept (one per state seen; a mask is `len(token_texts)` bytes).
    """

    def __init__(self, token_texts: list[str], eos_id: int | None, cache_size: int = 256):
        self.size, self.eos_id = len(token_texts), eos_id
        usable = np.asarray(
            [bool(t) and "\ufffd" not in t and i != eos_id for i, t in enumerate(token_texts)],
            bool,
        ).reshape(-1)
        plain = np.asarray(
            [not any(c in '"\\' or c < " " for c in t) for t in token_texts], bool
        ).reshape(-1)
        self.plain = usable & plain  # unchanged string state: allowed inside any string
        self.whitespace = usable & np.asarray([set(t) <= WS for t in token_texts], bool)
        self._all = _sorted_view(token_texts, np.flatnonzero(usable))
        self._special = _sorted_view(token_texts, np.flatnonzero(usable & ~plain))
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.texts = token_texts

    def _walk_view(self, view, state: State, max_ws, out: np.ndarray) -> None:
        texts, ids, lcp = view
        stack = [state]  # stack[k]: the state after the current text's first k characters
        i, n = 0, len(texts)
        while i < n:
            text = texts[i]
            depth = min(lcp[i], len(stack) - 1)
            del stack[depth + 1 :]
            current = stack[depth]
            for k in range(depth, len(text)):
                current = step(current, text[k], max_ws)
                if current is None:  # skip every token that starts with the dead prefix
                    i = bisect.bisect_left(texts, text[: k + 1] + TOP, i + 1)
                    break
                stack.append(current)
            else:
                out[ids[i]] = True
                i += 1

    def mask(self, state: State, max_ws: int | None) -> np.ndarray:
        """Read-only bool mask `(V,)` of the tokens allowed in `state`."""
        key = (state, max_ws)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        if state[0] == DONE:
            out = np.zeros(self.size, bool)
            if self.eos_id is not None:
                out[self.eos_id] = True
            else:
                out |= self.whitespace
        elif state[0] == STR:
            out = self.plain.copy()
            self._walk_view(self._special, state, max_ws, out)
        else:
            out = np.zeros(self.size, bool)
            self._walk_view(self._all, state, max_ws, out)
        out.flags.writeable = False
        with self._lock:
            self._cache[key] = out
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return out


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VOCABS: dict = {}  # id(token_texts list) -> (list, eos_id, JsonVocab), a few kept
_BUILD = threading.Lock()


def token_texts(tokenizer) -> list[str]:
    """The text of each id of `tokenizer` decoded alone (cached per tokenizer)."""
    with _BUILD:
        cached = _TEXTS.get(tokenizer)
        if cached is None:
            size = tokenizer.vocab_size
            hf = getattr(tokenizer, "hf_tokenizer", None)
            if hf is not None:
                cached = hf.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
            else:
                cached = [tokenizer.decode([i]) for i in range(size)]
            _TEXTS[tokenizer] = cached
        return cached


def json_vocab(texts: list[str], eos_id: int | None) -> JsonVocab:
    """The `JsonVocab` of `texts` (kept while the same list object is passed again)."""
    with _BUILD:
        hit = _VOCABS.get(id(texts))
        if hit is not None and hit[0] is texts and hit[1] == eos_id:
            return hit[2]
        vocab = JsonVocab(texts, eos_id)
        if len(_VOCABS) >= 4:
            _VOCABS.pop(next(iter(_VOCABS)))
        _VOCABS[id(texts)] = (texts, eos_id, vocab)
        return vocab


class JsonConstraint:
    """The state of one generation constrained to a JSON object.

    Args:
        token_texts: the text of each token id decoded alone (`token_texts(tokenizer)`,
            cached per tokenizer), or a prebuilt `JsonVocab`.
        eos_id: the end-of-sequence id, allowed once the object is closed (None: none;
            then the caller stops on `done`).
        max_ws: most consecutive whitespace characters outside strings (None: no limit);
            a model may otherwise emit whitespace until its token limit.

    `allowed()` may be all False in a state the vocabulary cannot continue (a character
    vocabulary without `{`): the caller ends the request. Once `done`, only EOS (or, with
    no EOS id, whitespace tokens) is allowed.

    Examples:

    >>> c = JsonConstraint(["{", "}", '"a"', ":", "1", " ", "<eos>"], eos_id=6)
    >>> [int(i) for i in c.allowed().nonzero()[0]]
    [0, 5]
    >>> for t in (0, 2, 3, 4, 1):
    ...     c.advance(t)
    >>> c.done, c.text, [int(i) for i in c.allowed().nonzero()[0]]
    (True, '{"a":1}', [6])
    """

    def __init__(self, token_texts, eos_id: int | None = None, max_ws: int | None = MAX_WS):
        self.vocab = (
            token_texts if isinstance(token_texts, JsonVocab) else json_vocab(token_texts, eos_id)
        )
        self.eos_id = self.vocab.eos_id
        self.max_ws = max_ws
        self.state: State = INITIAL
        self.text = ""

    @classmethod
    def for_tokenizer(cls, tokenizer, max_ws: int | None = MAX_WS) -> JsonConstraint:
        return cls(token_texts(tokenizer), tokenizer.eos_id, max_ws)

    @property
    def done(self) -> bool:
        """The top-level object is closed."""
        return self.state[0] == DONE

    def allowed(self) -> np.ndarray:
        """Bool mask `(V,)` of the tokens allowed next, `V = len(token_texts)` (the
        tokenizer's vocabulary: ids a larger model head has beyond it are not allowed);
        read-only, shared between calls."""
        return self.vocab.mask(self.state, self.max_ws)

    def advance(self, token_id: int) -> None:
        """Takes the generated `token_id`; ValueError if it was not allowed."""
        token_id = int(token_id)
        if token_id == self.eos_id:
            if not self.done:
                raise ValueError("EOS before the JSON object is complete")
            return
        text = self.vocab.texts[token_id] if 0 <= token_id < self.vocab.size else ""
        nxt = walk(self.state, text, self.max_ws) if text and "\ufffd" not in text else None
        if nxt is None:
            raise ValueError(f"token {token_id} ({text!r}) breaks the JSON object")
        self.state, self.text = nxt, self.text + text

    def copy(self) -> JsonConstraint:
        other = object.__new__(JsonConstraint)
        other.__dict__.update(self.__dict__)  # the state is an immutable tuple
        return other

    def closing(self) -> str:
        """The shortest text that would complete the object now."""
        return closing(self.state)


def is_object_prefix(text: str, max_ws: int | None = None) -> bool:
    """Whether some continuation of `text` is a JSON object."""
    return walk(INITIAL, text, max_ws) is not None
