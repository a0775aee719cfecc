"""Dynamic batching: a worker thread decodes waiting requests together.

HTTP handler threads `submit` a `Job` and read its `events` queue. The worker
takes the first waiting job, waits up to `window_s` for more (at most
`max_batch`), and decodes them as one batch through the one decode loop
(`generation.decoder.Decoder`, the loop `deepseek-tf generate` runs), `chunk`
positions at a time. After every chunk it hands each job its new tokens: the
job turns them into text, checks its stop strings, and the worker drops finished
or abandoned jobs (a client that disconnected) from the batch. `max_batch=1` turns batching off.

Jobs and their events: `serving.job`. The continuous scheduler
(`serving.scheduler`) is the server's default; this one is kept as `--batching dynamic`
(the comparison in `benchmarks/serve_load.py`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from deepseek_tf.generation.decoder import Decoder, Row
from deepseek_tf.generation.speculative import SpeculativeDecoder
from deepseek_tf.serving.job import Job
from deepseek_tf.serving.prefix_cache import PrefixCache
from deepseek_tf.serving.protocol import GenRequest

log = logging.getLogger("deepseek_tf.serving")


class Batcher:
    """Runs jobs on a background thread, batching those that arrive together (a
    `serving.job.Scheduler`; no prefix cache).

    Args:
        model: a `CausalLM`.
        tokenizer: its tokenizer (or None: token ids in, ids as text out).
        max_batch: most rows decoded together (1: no batching).
        window_s: how long the first waiting job waits for company.
        chunk: tokens decoded between checks (stop strings, disconnects, streaming);
            with `speculative`, draft-verify rounds between checks.
        jit_compile: compile with XLA.
        speculative: MTP speculative decoding with this many drafts per round
            (`generation.speculative`; rows of a batch share positions); None: off.
        metrics: the server's `ServerMetrics` (speculative acceptance), or None.
        warm_up: before `ready`, decode one short row (compiling the prefill chunks of
            prompts up to 63 tokens and the batch-1 decode call); False: ready at once,
            shapes compile on first use.
    """

    constrains = False  # whole generations per batch: no per-token masks

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 16,
        window_s: float = 0.005,
        chunk: int = 8,
        jit_compile: bool = True,
        speculative: int | None = None,
        metrics=None,
        warm_up: bool = False,
    ):
        self.tokenizer = tokenizer
        self.context = model.max_seq_len
        self.eos_id = None if tokenizer is None else tokenizer.eos_id
        vocab = None if tokenizer is None else tokenizer.vocab_size  # never an undecodable id
        if speculative:
            self.decoder = SpeculativeDecoder(model, speculative, jit_compile, vocab)
        else:
            self.decoder = Decoder(model, jit_compile=jit_compile, logprobs=True, vocab_limit=vocab)
        self.speculative = bool(speculative)
        self.metrics = metrics
        self.chunk = chunk
        self.max_batch = max(1, max_batch)
        self.window_s = window_s
        self._queue: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.ready = threading.Event()
        self.warm = warm_up
        self.prefix: PrefixCache | None = None
        self.batches = 0  # statistics: batches run and rows decoded
        self.rows = 0
        self.abandoned = 0  # rows dropped because their client went away
        self._running = 0  # rows of the batch being decoded

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def pending(self) -> int:
        """Jobs waiting for a batch (not counting the one being decoded)."""
        return self._queue.qsize()

    def running(self) -> int:
        """Jobs of the batch being decoded."""
        return self._running

    def submit(self, req: GenRequest, events: queue.Queue | None = None, index: int = 0) -> Job:
        job = Job(req, self.tokenizer, self.eos_id, events, index)
        self._queue.put(job)
        return job

    def _collect(self) -> list[Job]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs = [first]
        deadline = time.perf_counter() + self.window_s
        while len(jobs) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                jobs.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        self.abandoned += sum(j.cancelled for j in jobs)
        return [j for j in jobs if not j.cancelled]

    def warm_up(self) -> float:
        """Compiles the common shapes (see `warm_up` above); returns the seconds taken."""
        began = time.perf_counter()
        n = max(1, min(63, self.context - 3))
        state = self.decoder.start([Row([0] * n, 2, 0.0, 0, 1.0, 0)], [])
        while not state.finished:
            state.step(self.chunk)
        return time.perf_counter() - began

    def _run(self) -> None:
        try:
            if self.warm:
                log.info("compiled the serving shapes in %.1f s", self.warm_up())
        except Exception:
            log.exception("warm-up failed")  # serve anyway: shapes compile on first use
        self.ready.set()
        while not self._stopping.is_set():
            jobs = self._collect()
            if not jobs:
                continue
            self._running = len(jobs)
            try:
                self._decode(jobs)
            except Exception as e:  # a server bug: fail these jobs, keep serving
                log.exception("batch failed")
                for job in jobs:
                    if not job.finished:
                        job.finished = True
                        job.put(("error", f"generation failed: {type(e).__name__}"))
            finally:
                self._running = 0

    def _decode(self, jobs: list[Job]) -> None:
        self.batches += 1
        self.rows += len(jobs)
        rows = [
            Row(
                j.req.prompt_ids,
                j.req.max_tokens,
                j.req.temperature,
                j.req.top_k,
                j.req.top_p,
                j.seed,
                j.req.logit_bias,
                j.req.penalties,
            )
            for j in jobs
        ]
        stop_ids = [] if self.eos_id is None else [self.eos_id]
        state = self.decoder.start(rows, stop_ids)
        while not state.finished:
            if self.speculative:  # ids only: no log-probabilities on this path
                drafted, accepted = state.proposed.copy(), state.accepted.copy()
                new = [[(t, 0.0, [], 0.0) for t in row] for row in state.step(self.chunk)]
                if self.metrics is not None:
                    drafted, accepted = state.proposed - drafted, state.accepted - accepted
                    self.metrics.speculation_counts(drafted, accepted)
            else:
                new = state.step(self.chunk)
            for row, job in enumerate(jobs):
                if job.finished or job.cancelled:
                    if not job.finished and not state.done[row]:
                        self.abandoned += 1
                    state.cancel(row)
                    continue
                job.feed(new[row])
                if job.finished:
                    state.cancel(row)
        for job in jobs:
            job.finish("length")
