"""The continuous scheduler's rows: one decoding cache of `slots` rows held in variables,
and the compiled programs that write a prefilled row into it and decode every row.

The compiled steps update the variables in place (no copy of the cache per call). A
decode call reads only the first `span` positions of the positional tensors (keys and
values, MLA's latents; a convolution's state is read whole): the smallest of `spans()`
above every running row's last position; and a prompt is prefilled into a row of the
smallest span that holds it. So a short request costs nearly what it would in a server
with a short context, at the price of one compiled program per span.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from deepseek_tf.generation.decoding import TOP_LOGPROBS

MAX_CHUNK = 32  # most positions one decode call advances
MIN_SPAN = 256  # fewest cache positions a decode call reads (smaller: more programs)


class SlotCache:
    """`slots` rows of `length` positions of `model`'s cache, and their last logits.

    Args:
        model: a `CausalLM`.
        loop: its `generation.decoding.DecodeLoop` (the one step `generate` runs).
        slots: rows.
        length: positions per row.
        stop_ids: `(K,)` int32 tokens that end a row.
        jit_compile: compile with XLA.
        min_span: fewest positions a decode call reads (`length` or more: all of them).

    Attributes:
        cache: the cache variables, `(slots, length, ...)` per positional tensor.
        logits: `(slots, V)` each row's last logits.
        counts, seen: `(slots, V)` the repetition-penalty state (`generation.penalties`).
    """

    def __init__(self, model, loop, slots: int, length: int, stop_ids, *,
                 jit_compile: bool = True, min_span: int = MIN_SPAN):  # fmt: skip
        self.loop, self.slots, self.length, self.stop_ids = loop, slots, length, stop_ids
        self.min_span = max(1, int(min_span))
        vocab = model.vocab_size
        self.cache = tf.nest.map_structure(tf.Variable, model.init_cache(slots, length))
        self.logits = tf.Variable(tf.zeros((slots, vocab), tf.float32))  # (B, V)
        self.counts = tf.Variable(tf.zeros((slots, vocab), tf.float32))  # (B, V)
        self.seen = tf.Variable(tf.zeros((slots, vocab), tf.bool))  # (B, V)
        self.stateful = not all(map(self._positional, tf.nest.flatten(self.cache)))  # conv
        self.jit_compile = jit_compile
        self._programs: dict[int, tf.types.experimental.PolymorphicFunction] = {}  # by span
        self.insert = tf.function(self._insert_fn, jit_compile=jit_compile, autograph=False)
        # one call, not a slice per tensor
        self._read_row = tf.function(self._read_row_fn, autograph=False)
        self._rows_of = tf.function(self._rows_of_fn, autograph=False)

    def advance(self, positions, done, ends, sampling, steps, span: int, bias=None,
                penalties=None, grammar=None):  # fmt: skip
        """The compiled decode call of `span` (see `_advance_fn`): one `tf.function` per
        span, so that each traces only for its own arguments."""
        program = self._programs.get(span)
        if program is None:
            step = functools.partial(self._advance_fn, span=span)
            program = self._programs[span] = tf.function(
                step, jit_compile=self.jit_compile, autograph=False
            )
        return program(positions, done, ends, sampling, steps, bias=bias, penalties=penalties,
                       grammar=grammar)  # fmt: skip

    def traces(self) -> int:
        """Decode programs traced so far (every span's)."""
        return sum(p.experimental_get_tracing_count() for p in self._programs.values())

    def _positional(self, var) -> bool:
        """A cache tensor indexed by position, `(B, S, ...)` (not a convolution's state)."""
        return var.shape[1] == self.length

    def spans(self) -> list[int]:
        """The spans decode calls read: `min_span`, doubling, then the whole row."""
        out, span = [], min(self.min_span, self.length)
        while span < self.length:
            out.append(span)
            span *= 2
        return [*out, self.length]

    def span_for(self, last: int) -> int:
        """The smallest span that holds position `last`."""
        return next(s for s in self.spans() if s > last or s == self.length)

    def fit(self, row, span: int):
        """A batch-1 row cache (a prefix cache entry) resized to `span` positions: zeros
        appended, or positions cut (past those its prompt wrote, it holds nothing)."""
        out = []
        for var, t in zip(tf.nest.flatten(self.cache), tf.nest.flatten(row)):
            if self._positional(var) and t.shape[1] > span:
                t = t[:, :span]
            elif self._positional(var) and t.shape[1] < span:
                t = tf.pad(t, [[0, 0], [0, span - t.shape[1]]] + [[0, 0]] * (t.shape.rank - 2))
            out.append(t)
        return tf.nest.pack_sequence_as(row, out)

    def read_row(self, slot: int, span: int):
        """Row `slot`'s first `span` positions (its whole convolution state) as a batch-1
        cache."""
        return self._read_row(tf.constant(slot), span)

    def _read_row_fn(self, slot, span: int):
        return tf.nest.map_structure(
            lambda v: tf.gather(v, [slot])[:, :span] if self._positional(v) else v[slot:][:1],
            self.cache,
        )

    def reset_penalties(self, slot: int, counts, seen) -> None:
        """Row `slot`'s penalty state: `(1, V)` counts and seen tokens."""
        index = tf.constant([[slot]])
        self.counts.scatter_nd_update(index, tf.constant(counts))
        self.seen.scatter_nd_update(index, tf.constant(seen))

    def _insert_fn(self, slots, row_cache, row_logits):
        """Writes a cache of `K` rows (of `length` positions or fewer: the rest of each row
        keeps what it held, which no row reads past its own position) and their last
        logits `(K, V)` into rows `slots` (`(K,)`, or a scalar for one row). A slot named
        twice (a group of prompts padded to a compiled batch size) takes its first row, so
        the duplicate writes are the same bits."""
        slots = tf.reshape(slots, (-1,))  # (K,)
        same = tf.cast(slots[:, None] == slots[None, :], tf.int32)  # (K, K)
        first = tf.argmax(same, axis=1, output_type=tf.int32)  # (K,) the row each slot takes
        index = slots[:, None]  # (K, 1)
        for var, rows in zip(tf.nest.flatten(self.cache), tf.nest.flatten(row_cache)):
            rows = tf.gather(tf.cast(rows, var.dtype), first)  # (K, n, ...)
            if self._positional(var) and rows.shape[1] < self.length:
                k, n = rows.shape[0], rows.shape[1]
                at = tf.stack([tf.repeat(slots, n), tf.tile(tf.range(n), [k])], axis=1)
                var.scatter_nd_update(at, tf.reshape(rows, (k * n, *rows.shape[2:])))
            else:
                var.scatter_nd_update(index, rows)
        self.logits.scatter_nd_update(index, tf.gather(tf.cast(row_logits, tf.float32), first))

    def rows_of(self, cache) -> list:
        """A cache of `K` rows as `K` batch-1 caches (one call, not a slice per tensor)."""
        return self._rows_of(cache)

    def _rows_of_fn(self, cache):
        k = tf.nest.flatten(cache)[0].shape[0]
        return [tf.nest.map_structure(lambda t, i=i: t[i : i + 1], cache) for i in range(k)]

    def _window_index(self, span: int):
        """`(B, span, 2)` the `(row, position)` of every row's first `span` positions."""
        rows, positions = tf.meshgrid(tf.range(self.slots), tf.range(span), indexing="ij")
        return tf.stack([rows, positions], axis=-1)

    def _window(self, var, index):
        """`var` at `index` (`_window_index`), `(B, span, ...)`. A gather from the
        variable, not a slice of its value: TensorFlow copies the whole variable to slice
        its value (measured: 906 MB of a 4,096-position cache per call for a 1.46B model,
        while the window was 57 MB), and then again to assign a slice back (hence
        `scatter_nd_update` for the write)."""
        return tf.raw_ops.ResourceGather(
            resource=var.handle, indices=index[..., 1], dtype=var.dtype, batch_dims=1
        )  # each row's positions

    def _advance_fn(self, positions, done, ends, sampling, steps, span: int, bias=None,
                    penalties=None, grammar=None):  # fmt: skip
        """Up to `steps` positions of every row not `done` -> `(steps_run, tokens (B, K),
        logprobs (B, K), top_ids (B, K, TOP), top_logprobs (B, K, TOP), entropies (B, K),
        grammar states (B,))` with `K = MAX_CHUNK`; the cache's first `span` positions and
        the logits variables (and, with the `penalties` settings, the penalty state) are
        updated in place. `grammar`: the rows' token automata (`token_step`); without it
        the states returned are zeros."""
        b = self.slots
        window = span < self.length  # a slice of the positional tensors, else all of them
        index = self._window_index(span)  # (B, span, 2): read and written back
        cache = tf.nest.map_structure(
            lambda v: self._window(v, index) if window and self._positional(v) else v.read_value(),
            self.cache,
        )  # (B, span, ...)
        logits = self.logits.read_value()
        state = ()
        if penalties is not None:
            state = (*penalties, self.counts.read_value(), self.seen.read_value())
        none = tf.zeros((b,), tf.bool)
        out = (tf.zeros((b, MAX_CHUNK), tf.int32), tf.zeros((b, MAX_CHUNK)),
               tf.zeros((b, MAX_CHUNK, TOP_LOGPROBS), tf.int32),
               tf.zeros((b, MAX_CHUNK, TOP_LOGPROBS)), tf.zeros((b, MAX_CHUNK)))  # fmt: skip

        tables = tuple(grammar[:4]) if grammar is not None else None  # all but the states
        states = grammar[4] if grammar is not None else tf.zeros((b,), tf.int32)

        def body(j, positions, done, cache, logits, out, state, states):
            zero = tf.zeros((b,), tf.int32)
            rules = (*tables, states) if tables else None
            step = self.loop.token_step(cache, logits, positions, none, zero, done, sampling,
                                        self.stop_ids, bias, state or None, rules)  # fmt: skip
            token, stopped, logprob, top_ids, top_lps, entropy, logits, cache, state, rules = step
            column = tf.stack([tf.range(b), tf.fill((b,), j)], axis=1)  # (B, 2)
            values = (token, logprob, top_ids, top_lps, entropy)
            out = tuple(tf.tensor_scatter_nd_update(o, column, v) for o, v in zip(out, values))
            moving = tf.logical_not(done)
            done = tf.logical_or(done, tf.logical_or(stopped, positions + 1 >= ends))
            positions = tf.where(moving, tf.minimum(positions + 1, self.length - 1), positions)
            states = rules[4] if rules else states
            return j + 1, positions, done, cache, logits, out, state or (), states

        def cond(j, positions, done, *_):
            return tf.logical_and(j < steps, tf.logical_not(tf.reduce_all(done)))

        loop = (tf.constant(0), positions, done, cache, logits, out, state, states)
        j, _, _, cache, logits, out, state, states = tf.while_loop(cond, body, loop)
        for var, value in zip(tf.nest.flatten(self.cache), tf.nest.flatten(cache)):
            if window and self._positional(var):
                var.scatter_nd_update(index, value)
            else:
                var.assign(value)
        self.logits.assign(logits)
        if state:
            self.counts.assign(state[3])
            self.seen.assign(state[4])
        return (j, *out, states)
