"""Dynamic batching: a worker thread decodes waiting requests together.

HTTP handler threads `submit` a `Job` and read its `events` queue. The worker
takes the first waiting job, waits up to `window_s` for more (at most
`max_batch`), and decodes them as one batch through the one decode loop
(`generation.decoding.Decoder`, the loop `deepseek-tf generate` runs), `chunk`
positions at a time. After every chunk it hands each job its new tokens: the
job turns them into text, checks its stop strings, and the worker drops finished
or abandoned jobs (a client that disconnected) from the batch. `max_batch=1` turns batching off.

Events on `Job.events`: `("delta", text, tokens)` where `tokens` is a list of
`(token_id, token_text, logprob, [(alt_text, alt_logprob), ...], entropy)`, then one
`("end", finish_reason)` or `("error", message)`.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time

from deepseek_tf.generation.decoding import Decoder, Row
from deepseek_tf.serving.protocol import GenRequest

log = logging.getLogger("deepseek_tf.serving")


class Job:
    """One generation request travelling through the batcher."""

    def __init__(self, req: GenRequest, tokenizer, eos_id: int | None):
        self.req = req
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.seed = req.seed if req.seed is not None else random.getrandbits(31)  # < 2**31
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False  # set by the handler when its client goes away
        self.finished = False
        self.finish_reason: str | None = None
        self.tokens: list[int] = []
        self.text = ""  # the text of `tokens`, cut at a stop string
        self.sent = 0  # characters of `text` already emitted
        self.started = time.perf_counter()
        self._hold = max((len(s) for s in req.stop), default=1) - 1

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            return "".join(f" {t}" for t in ids)
        return self.tokenizer.decode(list(ids))

    def feed(self, new) -> None:
        """Takes new `(token, logprob, top, entropy)` entries from the decoder; emits a
        delta."""
        entries = []
        for token, logprob, top, entropy in new:
            if self.finished:
                break
            if token == self.eos_id:
                self.finished, self.finish_reason = True, "stop"
                break
            self.tokens.append(token)
            alts = [(self.decode([t]), lp) for t, lp in top[: self.req.logprobs or 0]]
            entries.append((token, self.decode([token]), logprob, alts, entropy))
        text = self.decode(self.tokens)
        if self.req.stop and not self.finished:
            search_from = max(0, self.sent - self._hold)
            hits = [i for i in (text.find(s, search_from) for s in self.req.stop) if i >= 0]
            if hits:
                cut = min(hits)
                keep = len(self.tokens)
                while keep and len(self.decode(self.tokens[:keep])) > cut:
                    keep -= 1
                entries = entries[: max(0, len(entries) - (len(self.tokens) - keep))]
                self.tokens, text = self.tokens[:keep], text[:cut]
                self.finished, self.finish_reason = True, "stop"
        if not self.finished and len(self.tokens) >= self.req.max_tokens:
            self.finished, self.finish_reason = True, "length"
        self.text = text
        ready = len(text)
        if not self.finished:
            ready = max(self.sent, ready - self._hold)  # a stop string may still start here
            while ready > self.sent and text[ready - 1] == "\ufffd":  # an incomplete character
                ready -= 1
        delta, self.sent = text[self.sent : ready], max(self.sent, ready)
        if delta or entries:
            self.events.put(("delta", delta, entries))
        if self.finished:
            self.events.put(("end", self.finish_reason))

    def finish(self, reason: str = "length") -> None:
        if not self.finished:
            self.finished, self.finish_reason = True, reason
            tail = self.text[self.sent :]
            if tail:
                self.events.put(("delta", tail, []))
            self.events.put(("end", reason))


class Batcher:
    """Runs jobs on a background thread, batching those that arrive together.

    Args:
        model: a `CausalLM`.
        tokenizer: its tokenizer (or None: token ids in, ids as text out).
        max_batch: most rows decoded together (1: no batching).
        window_s: how long the first waiting job waits for company.
        chunk: tokens decoded between checks (stop strings, disconnects, streaming).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 16,
        window_s: float = 0.005,
        chunk: int = 8,
        jit_compile: bool = True,
    ):
        self.tokenizer = tokenizer
        self.eos_id = None if tokenizer is None else tokenizer.eos_id
        vocab = None if tokenizer is None else tokenizer.vocab_size  # never an undecodable id
        self.decoder = Decoder(model, jit_compile=jit_compile, logprobs=True, vocab_limit=vocab)
        self.chunk = chunk
        self.max_batch = max(1, max_batch)
        self.window_s = window_s
        self._queue: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.batches = 0  # statistics: batches run and rows decoded
        self.rows = 0
        self.abandoned = 0  # rows dropped because their client went away

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def pending(self) -> int:
        """Jobs waiting for a batch (not counting the one being decoded)."""
        return self._queue.qsize()

    def submit(self, req: GenRequest) -> Job:
        job = Job(req, self.tokenizer, self.eos_id)
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

    def _run(self) -> None:
        while not self._stopping.is_set():
            jobs = self._collect()
            if not jobs:
                continue
            try:
                self._decode(jobs)
            except Exception as e:  # a server bug: fail these jobs, keep serving
                log.exception("batch failed")
                for job in jobs:
                    if not job.finished:
                        job.finished = True
                        job.events.put(("error", f"generation failed: {type(e).__name__}"))

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
            )
            for j in jobs
        ]
        stop_ids = [] if self.eos_id is None else [self.eos_id]
        state = self.decoder.start(rows, stop_ids)
        while not state.finished:
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
