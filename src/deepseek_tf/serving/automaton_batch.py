"""The token automata of a running batch as the tensors one decode call reads.

Each constrained row follows its schema's `TokenAutomaton` (`serving.token_automaton`);
rows of one batch may follow different schemas, and free rows none. One call takes them
all as `(table, classes, dead, which, states)` (`generation.sampler.constrain`): the
automata's tables stacked block-diagonally -- state 0 and class 0 are a free row's, where
every token is allowed and the state stays 0 -- each automaton's token classes as a row
of `classes` (row 0: the free row's, all class 0), and each batch row's automaton
(`which`) and state in the stacked numbering.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from deepseek_tf.generation.decoding import pad_batch
from deepseek_tf.serving.token_automaton import TokenAutomaton


def _bucket(n: int, least: int) -> int:
    """`n` rounded up to a power of two, at least `least` (a new size is a new program)."""
    return max(least, pad_batch(n))


class AutomatonBatch:
    """The automata of a batch's rows, stacked for the decode call.

    A row keeps its own automaton's state between calls; the stack is rebuilt when the
    set of automata changes.

    Args:
        slots: rows in the batch.
        width: the model's vocabulary (ids past an automaton's are never allowed in it).

    Examples:
        batch = AutomatonBatch(slots=16, width=model.vocab_size)
        batch.seat(3, automaton)
        grammar = batch.call_args()  # `SlotCache.advance(grammar=...)`
        batch.update(states_after)  # the states the call returned
    """

    MIN_STATES, MIN_CLASSES, MIN_AUTOMATA = 64, 64, 4

    def __init__(self, slots: int, width: int):
        self.width = width
        self.rows: list[TokenAutomaton | None] = [None] * slots
        self.local = np.zeros(slots, np.int32)  # each row's state in its own automaton
        self._members: tuple = ()
        self._offsets: dict[int, tuple[int, int]] = {}  # id -> (its index, its first state)
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
        n_states = _bucket(1 + sum(a.states for a in members), self.MIN_STATES)
        n_classes = _bucket(1 + sum(a.table.shape[1] for a in members), self.MIN_CLASSES)
        table = np.full((n_states, n_classes), -1, np.int32)  # (S, C)
        table[0, 0] = 0  # a free row: every token in class 0, staying in state 0
        classes = np.zeros((_bucket(1 + len(members), self.MIN_AUTOMATA), self.width), np.int32)
        dead = np.zeros(n_states, bool)
        state, column, self._offsets = 1, 1, {}
        for index, a in enumerate(members, start=1):
            (rows, cols), vocab = a.table.shape, a.classes.shape[0]
            block = np.where(a.table >= 0, a.table + state, -1)
            table[state : state + rows, column : column + cols] = block
            classes[index, :vocab] = a.classes + column
            classes[index, vocab:] = column  # its class 0: never allowed
            dead[state : state + rows] = a.dead
            self._offsets[id(a)] = (index, state)
            state, column = state + rows, column + cols
        self._members = members
        self._tensors = tuple(map(tf.constant, (table, classes, dead)))

    def call_args(self) -> tuple:
        """`(table (S, C), classes (A, V), dead (S,), which (B,), states (B,))` for the
        call (int32, but `dead`: bool)."""
        members = tuple({id(a): a for a in self.rows if a is not None}.values())
        if tuple(map(id, members)) != tuple(map(id, self._members)):
            self._build(members)
        which, states = np.zeros(len(self.rows), np.int32), np.zeros(len(self.rows), np.int32)
        for slot, a in enumerate(self.rows):
            if a is not None:
                index, first = self._offsets[id(a)]
                which[slot], states[slot] = index, first + self.local[slot]
        return (*self._tensors, tf.constant(which), tf.constant(states))

    def update(self, states) -> None:
        """Takes each row's state after a call (`(B,)` in the call's numbering)."""
        for slot, a in enumerate(self.rows):
            if a is not None:
                self.local[slot] = int(states[slot]) - self._offsets[id(a)][1]
