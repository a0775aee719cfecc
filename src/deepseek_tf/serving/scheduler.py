"""Continuous batching: requests join and leave the running batch between decode steps.

The server's default scheduler (vLLM's and llama.cpp's server's model). The batch is a
fixed set of `max_batch` slots, each a row of one decoding cache held in variables (the
compiled steps update it in place: no copy of the cache per call). A worker thread loops:

1. admit: each waiting request takes a free slot. Prompts admitted together with no
   useful prefix in the prefix cache are prefilled together in padded calls; a prompt
   that continues a cached prefix is prefilled alone after it (`serving.prefiller`).
   Each row is written into its slot;
2. decode: every busy slot advances up to `chunk` positions in one compiled loop of
   `DecodeLoop.token_step` -- the step `generate` runs -- each row at its own position
   and sampled with its own seed, so a request gets the tokens `deepseek-tf generate`
   gives it whatever else is running. `chunk` adapts so that a call lasts about
   `step_ms` (joining requests wait at most that long), at most `stream_interval`
   while a request streams (its client sees tokens that often: a compiled call has a
   fixed cost of about a millisecond, so one call per token would halve throughput),
   and 1 while a request needs a host decision per token (structured output under an
   open schema: `serving.grammar`; a closed schema's automaton is followed in the loop,
   `serving.token_automaton`).
   A call reads only the cache positions its rows can reach (`serving.slot_cache`: the
   smallest of its spans above every running row's last position);
3. hand each job its new tokens (text, stop strings, limits, streaming); finished and
   abandoned (disconnected, timed out) rows free their slots at once.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import astuple

import numpy as np
import tensorflow as tf

from deepseek_tf.generation import penalties as pen
from deepseek_tf.generation.decoding import DecodeLoop
from deepseek_tf.generation.sampler import bias_matrix
from deepseek_tf.serving.automaton_batch import AutomatonBatch
from deepseek_tf.serving.job import Job
from deepseek_tf.serving.metrics import ServerMetrics
from deepseek_tf.serving.prefiller import Prefiller, adapter_rows
from deepseek_tf.serving.prefix_cache import PrefixCache
from deepseek_tf.serving.protocol import GenRequest
from deepseek_tf.serving.slot_cache import MAX_CHUNK, MIN_SPAN, SlotCache

log = logging.getLogger("deepseek_tf.serving")
WARM_SPANS = 4096  # spans up to this (and the whole cache) compile before `ready`
WARM_TRACED_CHUNK = 8  # the longest prefill chunk a warm-up runs when not XLA-compiled
# a decode call's target duration: its fixed cost (the call, ~4 ms of handing out tokens
# for 16 rows) is 7% of 50 ms and 17% of 20 ms (benchmarks/serve_load.py, --step-ms)
STEP_MS = 50.0


class ContinuousScheduler:
    """Slots, the decode worker and the prefix cache of one served model.

    Args:
        model: a `CausalLM`.
        tokenizer: its tokenizer (or None: token ids in, ids as text out).
        metrics: the server's `ServerMetrics` (None: a private one).
        max_batch: slots (rows decoded together).
        step_ms: target duration of one decode call (sets the adaptive chunk).
        stream_interval: most tokens decoded per call while a request streams.
        prefix_cache_mb: memory for the prefix cache (0: off).
        max_len: positions per slot (None: the model's context; see
            `serving.kv_budget.plan_cache`).
        jit_compile: compile with XLA.
        warm_up: compile every serving shape before `ready` is set (False: shapes compile
            on first use).
        lora: the served LoRA adapters (`models.multi_lora.MultiLora`), selected per slot
            by each request's `adapter` (None: the base alone).
        min_span: fewest cache positions a decode call attends over (see the module
            docstring; `max_len` or more: always the whole cache).
        in_loop_grammar: follow closed schemas' token automata inside the decode loop
            (False: on the host, one token per call -- the plain reference).
    """

    constrains = True  # structured output (host-masked rows: one step per call)

    def __init__(self, model, tokenizer, metrics: ServerMetrics | None = None, *,
                 max_batch: int = 16, step_ms: float = STEP_MS, stream_interval: int = 16,
                 prefix_cache_mb: float = 256, max_len: int | None = None,
                 jit_compile: bool = True, warm_up: bool = True, lora=None,
                 min_span: int = MIN_SPAN, in_loop_grammar: bool = True):  # fmt: skip
        self.model, self.tokenizer, self.lora = model, tokenizer, lora
        self.metrics = metrics or ServerMetrics("model")
        self.eos_id = None if tokenizer is None else tokenizer.eos_id
        vocab = None if tokenizer is None else tokenizer.vocab_size  # never an undecodable id
        self.loop = DecodeLoop(model, jit_compile=jit_compile, logprobs=True, vocab_limit=vocab)
        self.slots = max(1, int(max_batch))
        self.length = min(int(max_len or model.max_seq_len), model.max_seq_len)
        self.step_ms = step_ms
        self.stream_interval = max(1, int(stream_interval))
        self.warm = warm_up
        b, s = self.slots, self.length
        stops = [] if self.eos_id is None else [self.eos_id]
        stop_ids = tf.constant(stops or [-1], tf.int32)
        self.rows_cache = SlotCache(
            model, self.loop, b, s, stop_ids, jit_compile=self.loop.jit_compile, min_span=min_span
        )
        self.bias = np.zeros((b, model.vocab_size), np.float32)  # each slot's `logit_bias`
        self.biased = np.zeros(b, bool)
        # a decode call always takes a bias, zeros when no row has one: a second variant of
        # a program is a whole second trace and XLA compilation (~5 s per span for the
        # 1.46B demonstration, half of the warm-up's decode programs), while adding zeros
        # to the logits costs nothing
        self.no_bias = tf.zeros_like(self.bias)
        # repetition penalties (`generation.penalties`): settings per slot, state in variables
        self.penalty_settings = pen.settings_arrays([], b)
        self.automata = AutomatonBatch(b, model.vocab_size)  # structured output's, per slot
        self.in_loop_grammar = in_loop_grammar
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20), exact_only=self.rows_cache.stateful)
        self.prefiller = Prefiller(model, self.loop, self.rows_cache, self.prefix, lora)
        self.jobs: list[Job | None] = [None] * b
        self.positions = np.zeros(b, np.int32)
        self.ends = np.ones(b, np.int32)
        self.adapters = np.zeros(b, np.int32)  # each slot's LoRA adapter (0: the base)
        self.sampling = [np.zeros(b, np.float32), np.zeros(b, np.int32),
                         np.ones(b, np.float32), np.zeros(b, np.int32)]  # fmt: skip
        self._queue: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._per_token_s = 0.002  # running estimate of one position's decode time
        self.rows = 0  # statistics: rows admitted, rows abandoned by their client, decode calls
        self.abandoned = self.decode_calls = 0

    @property
    def cache(self):
        """The slots' cache variables, `(B, S, ...)` (held by `rows_cache`)."""
        return self.rows_cache.cache

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ContinuousScheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def warm_up(self) -> float:
        """Compiles every shape the server uses (each prefill chunk, the decode call, the
        slot write); returns the seconds it took."""
        began = time.perf_counter()
        spans = self.rows_cache.spans()
        # an XLA prefill compiles every chunk length; a traced one generalises its shapes
        # after a few lengths (`reduce_retracing`), and the 1.46B demonstration spent
        # ~95 s prefilling the long chunks of a 4,096-position cache for nothing
        longest = None if self.loop.prefill_jit_compile else WARM_TRACED_CHUNK
        for span in sorted({spans[0], self.length}):  # prompts of other spans: on first use
            self.prefiller.warm_up(span, longest, groups=span == spans[0])
        done = np.ones(self.slots, bool)
        done[0] = False
        for span in self.rows_cache.spans():
            if span > WARM_SPANS and span != self.length:
                continue  # compiled on first use
            self.positions[0] = span - 1
            self._call(done, steps=1)  # with or without `logit_bias`: one program
        self.positions[0] = 0
        return time.perf_counter() - began

    def pending(self) -> int:
        """Requests waiting for a slot."""
        return self._queue.qsize()

    def running(self) -> int:
        return sum(j is not None for j in self.jobs)

    def submit(self, req: GenRequest, events: queue.Queue | None = None, index: int = 0) -> Job:
        job = Job(req, self.tokenizer, self.eos_id, events, index)
        self._queue.put(job)
        self.metrics.queue_depth.set(self._queue.qsize())
        return job

    # -- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.warm:
                seconds = self.warm_up()
                log.info("compiled the serving shapes in %.1f s", seconds)
        except Exception:
            log.exception("warm-up failed")  # serve anyway: shapes compile on first use
        self.ready.set()
        while not self._stopping.is_set():
            try:
                self._admit(block=self.running() == 0)
                if self.running():
                    self._decode()
            except Exception as e:  # a server bug: fail the running jobs, keep serving
                log.exception("decode step failed")
                for slot, job in enumerate(self.jobs):
                    if job is not None and not job.finished:
                        job.finished = True
                        job.put(("error", f"generation failed: {type(e).__name__}"))
                    self.jobs[slot] = None
                    self.automata.seat(slot, None)
            self.metrics.running_rows.set(self.running())
            self.metrics.queue_depth.set(self._queue.qsize())

    def _admit(self, block: bool) -> None:
        """Seats waiting requests in the free slots (module docstring, step 1)."""
        jobs = []
        while len(jobs) < self.jobs.count(None):
            try:
                job = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
            except queue.Empty:
                break
            block = False
            if job.cancelled:
                self.abandoned += 1
                job.finish("cancelled")
            else:
                jobs.append(job)
        slots = [s for s, j in enumerate(self.jobs) if j is None]
        fresh = []  # (slot, job): prompts prefilled from position 0, together
        for slot, job in zip(slots, jobs):
            req = job.req
            shared, row = self.prefix.lookup(req.prompt_ids, namespace=req.adapter)
            grouped = self.prefiller.groupable(len(req.prompt_ids), shared)
            self._count(job, 0 if grouped else shared)
            if grouped:
                fresh.append((slot, job))
            else:
                self._seated([(slot, job)], self.prefiller.one, slot, list(req.prompt_ids),
                             req.adapter, shared, row)  # fmt: skip
        size = self.prefiller.groups[-1]
        for group in (fresh[i : i + size] for i in range(0, len(fresh), size)):
            slots, reqs = [s for s, _ in group], [j.req for _, j in group]
            prompts, adapters = [list(r.prompt_ids) for r in reqs], [r.adapter for r in reqs]
            if len(group) == 1:
                self._seated(group, self.prefiller.one, slots[0], prompts[0], adapters[0])
            else:
                self._seated(group, self.prefiller.group, slots, prompts, adapters)

    def _seated(self, group: list[tuple[int, Job]], prefill, *args) -> None:
        """`prefill(*args)`, then each `(slot, job)` of `group` takes its slot; a failure
        ends the group's jobs with an error and frees their slots, not the worker."""
        try:
            prefill(*args)
            for slot, job in group:
                self._seat(slot, job)
        except Exception as e:
            log.exception("prefill failed")
            for slot, job in group:
                job.finished = True
                job.put(("error", f"generation failed: {type(e).__name__}"))
                self.jobs[slot] = None
                self.automata.seat(slot, None)

    def _count(self, job: Job, shared: int) -> None:
        """Records `job`'s admission, `shared` prompt tokens read from the prefix cache."""
        job.admitted_at = time.perf_counter()
        job.cached_tokens = shared
        self.metrics.prefix_queried.inc(len(job.req.prompt_ids))
        self.metrics.prefix_hit.inc(shared)
        self.metrics.prompt_tokens.inc(len(job.req.prompt_ids))

    def _seat(self, slot: int, job: Job) -> None:
        """Gives `slot` to `job`, whose prompt is in its row: positions, limits, sampling,
        `logit_bias`, penalties and grammar."""
        req, prompt = job.req, job.req.prompt_ids
        self.jobs[slot] = job
        self.positions[slot] = len(prompt)
        self.ends[slot] = len(prompt) + req.max_tokens
        self.adapters[slot] = req.adapter
        settings = (req.temperature, req.top_k, req.top_p, job.seed)
        for array, value in zip(self.sampling, settings):
            array[slot] = value
        row = bias_matrix([req.logit_bias], 1, self.model.vocab_size)  # (1, V) or None
        self.bias[slot], self.biased[slot] = (0.0, False) if row is None else (row[0], True)
        for array, value in zip(self.penalty_settings, astuple(req.penalties)):
            array[slot] = value
        if req.penalties.active:  # a clean state: nothing generated, the prompt seen
            counts, seen = pen.initial_state([prompt], 1, self.model.vocab_size)
            self.rows_cache.reset_penalties(slot, counts, seen)
        if req.grammar is not None:  # compiled and checked when the request was read
            in_loop = self.in_loop_grammar and req.grammar.automaton is not None
            self.automata.seat(slot, req.grammar.automaton if in_loop else None)
            job.constraint = None if in_loop else req.grammar.host_constraint()
        self.rows += 1

    def _span(self, done, steps: int) -> int:
        """The span that holds every running row's next `steps` positions."""
        live = self.positions[~done]
        return self.rows_cache.span_for(int(live.max()) + steps - 1 if live.size else 0)

    def _call(self, done, steps: int, bias=None, penalties: bool = False):
        sampling = tuple(tf.constant(a) for a in self.sampling)
        positions = np.where(done, 0, self.positions)  # a free slot's stays inside the span
        args = (tf.constant(positions), tf.constant(done), tf.constant(self.ends), sampling,
                tf.constant(steps, tf.int32), self._span(done, steps))  # fmt: skip
        extra = {"bias": self.no_bias if bias is None else tf.constant(bias)}
        if penalties:
            extra["penalties"] = tuple(map(tf.constant, self.penalty_settings))
        if self.automata.active:
            extra["grammar"] = self.automata.call_args()
        self.decode_calls += 1
        with adapter_rows(self.lora, self.adapters):
            return self.rows_cache.advance(*args, **extra)

    def _decode(self) -> None:
        constrained = [s for s, j in enumerate(self.jobs) if j is not None and j.constraint]
        bias = self.bias.copy() if constrained or self.biased.any() else None  # (B, V)
        if constrained:
            for s in constrained:
                allowed = self.jobs[s].constraint.allowed()  # (V_tokenizer,)
                if not allowed.any():  # the vocabulary cannot continue the document
                    self.jobs[s].finish("stop")
                    self._release(s, store=False)
                    continue
                bias[s, : len(allowed)] += np.where(allowed, 0.0, -1e9)
                bias[s, len(allowed) :] = -1e9
            steps = 1
            if self.running() == 0:
                return
        else:
            # rounded up: a call's fixed cost is in the estimate, so rounding down could
            # settle on 1 step per call, whose estimate then justifies only 1 step
            steps = int(np.clip(math.ceil(self.step_ms / 1e3 / self._per_token_s), 1, MAX_CHUNK))
            if any(j is not None and j.req.stream for j in self.jobs):
                steps = min(steps, self.stream_interval)
        done = np.asarray([j is None for j in self.jobs])
        penalised = any(j is not None and j.req.penalties.active for j in self.jobs)
        began = time.perf_counter()
        out = self._call(done, steps, bias, penalised)
        ran, tokens, logprobs, top_ids, top_lps, entropy, states = (np.asarray(t) for t in out)
        ran = int(ran)
        if self.automata.active:
            self.automata.update(states)
        if ran:
            seconds = time.perf_counter() - began
            self._per_token_s = 0.8 * self._per_token_s + 0.2 * seconds / ran
        now = time.perf_counter()
        for slot, job in enumerate(self.jobs):
            if job is None:
                continue
            n = min(ran, int(self.ends[slot] - self.positions[slot]))
            if job.cancelled:
                self.abandoned += 1
                self._release(slot, store=False)
                continue
            row = tokens[slot, :n].tolist()
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            lps, ents = logprobs[slot, : len(row)].tolist(), entropy[slot, : len(row)].tolist()
            if job.req.logprobs:  # alternatives only for a request that reports them
                ids, alt_lps = top_ids[slot, : len(row)], top_lps[slot, : len(row)]
                alts = [list(zip(i, a)) for i, a in zip(ids.tolist(), alt_lps.tolist())]
            else:
                alts = [[]] * len(row)
            new = list(zip(row, lps, alts, ents))
            self.positions[slot] += len(new)
            job.deliver(new, now, self.metrics)
            if job.constraint is not None and new and not job.finished:
                try:
                    job.constraint.advance(new[-1][0])
                except ValueError:  # cannot happen under the mask; end the row, not the batch
                    log.exception("a constrained row left its grammar")
                    job.finish("stop")
                if job.constraint.done and self.eos_id is None:
                    job.finish("stop")
            if self.automata.dead(slot) and not job.finished:  # the document is complete
                job.finish("stop")
            if job.finished or self.positions[slot] >= self.ends[slot]:
                job.finish("length")
                self._release(slot, store=True)

    def _release(self, slot: int, store: bool) -> None:
        job = self.jobs[slot]
        self.jobs[slot] = None
        self.bias[slot], self.biased[slot] = 0.0, False
        self.adapters[slot] = 0
        self.automata.seat(slot, None)
        for array, neutral in zip(self.penalty_settings, astuple(pen.Penalties())):
            array[slot] = neutral
        if job.finished:
            self.metrics.finish(job.finish_reason or "length")
            self.metrics.e2e.observe((job.finished_at or time.perf_counter()) - job.started)
        else:  # its client left or timed out
            self.metrics.finish("abort")
        if store and self.prefix.enabled and not self.prefix.exact_only:
            # the row now holds the prompt and the reply: a chat's next turn starts with both
            tokens = list(job.req.prompt_ids) + job.tokens
            n = min(len(tokens), int(self.positions[slot]))
            row = self.rows_cache.read_row(slot, self.rows_cache.span_for(n - 1))
            self.prefix.store(tokens[:n], row, namespace=job.req.adapter)
