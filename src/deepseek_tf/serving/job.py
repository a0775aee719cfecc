"""One generation request travelling through a scheduler, its events, and what a
scheduler offers the server (`Scheduler`).

HTTP handler threads submit a `Job` (`ContinuousScheduler.submit` or `Batcher.submit`)
and read its `events` queue: `(index, ("delta", text, tokens))` where `tokens` is a list of
`(token_id, token_text, logprob, [(alt_text, alt_logprob), ...], entropy)`, then one
`(index, ("end", finish_reason))` or `(index, ("error", message))`; `index` is the job's
choice of its request (a request with `n` choices runs `n` jobs on one queue). The
scheduler feeds each job the tokens decoded for it; the job turns them into text, checks
its stop strings and limits.

Two schedulers implement `Scheduler`: `ContinuousScheduler` (`serving.scheduler`, the
default) and the dynamic `Batcher` (`serving.batcher`).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from typing import Protocol, runtime_checkable

from deepseek_tf.serving.prefix_cache import PrefixCache
from deepseek_tf.serving.protocol import GenRequest


class Job:
    """One generation request travelling through a scheduler.

    Args:
        req: the validated request.
        tokenizer: decodes its tokens (None: ids as text).
        eos_id: the token that ends it (None: none).
        events: the queue its events go to (None: a queue of its own).
        index: its choice of the request (`n` > 1); with a `seed`, choice `i` samples
            with `seed + i`.
    """

    def __init__(self, req: GenRequest, tokenizer, eos_id: int | None,
                 events: queue.Queue | None = None, index: int = 0):  # fmt: skip
        self.req = req
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.index = index
        seed = req.seed if req.seed is not None else random.getrandbits(31)
        self.seed = (seed + index) % 2**31
        self.events: queue.Queue = queue.Queue() if events is None else events
        self.cancelled = False  # set by the handler when its client goes away
        self.finished = False
        self.finish_reason: str | None = None
        self.tokens: list[int] = []
        self.text = ""  # the text of `tokens`, cut at a stop string
        self.sent = 0  # characters of `text` already emitted
        # timings (perf_counter seconds) and counts for `usage`, `timings` and /metrics
        self.started = time.perf_counter()  # arrival
        self.admitted_at: float | None = None  # given a slot (prefill starts)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.last_delivery: float | None = None  # when the scheduler last fed it tokens
        self.prompt_tokens = len(req.prompt_ids)
        self.cached_tokens = 0  # prompt tokens served from the prefix cache
        self.constraint = None  # followed on the host (`structured.ReplyGrammar.host_constraint`)
        self._hold = max((len(s) for s in req.stop), default=1) - 1

    def put(self, event: tuple) -> None:
        """Sends `event` to the handler, tagged with this job's choice index."""
        self.events.put((self.index, event))

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
        if entries and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if delta or entries:
            self.put(("delta", delta, entries))
        if self.finished:
            self.finished_at = time.perf_counter()
            self.put(("end", self.finish_reason))

    def deliver(self, new, now: float, metrics) -> None:
        """`feed(new)`, observed in the server's `metrics` (tokens, TTFT, inter-token gaps)."""
        first, before = self.first_token_at is None, len(self.tokens)
        self.feed(new)
        produced = len(self.tokens) - before
        metrics.generated_tokens.inc(len(new))
        if first and self.first_token_at is not None:
            metrics.ttft.observe(self.first_token_at - self.started)
        elif produced:
            gap = (now - (now if self.last_delivery is None else self.last_delivery)) / produced
            for _ in range(produced):
                metrics.inter_token.observe(gap)
        self.last_delivery = now

    def finish(self, reason: str = "length") -> None:
        if not self.finished:
            self.finished, self.finish_reason = True, reason
            self.finished_at = time.perf_counter()
            tail = self.text[self.sent :]
            if tail:
                self.put(("delta", tail, []))
            self.put(("end", reason))


@runtime_checkable
class Scheduler(Protocol):
    """What `ServingApp` needs from the scheduler that decodes its jobs.

    Attributes:
        ready: set once the serving shapes are compiled (at once without a warm-up);
            `/health` answers 503 until then.
        rows: rows admitted so far (statistics).
        prefix: the prefix cache, or None for a scheduler without one.
        constrains: whether it holds replies to a grammar (structured output, forced
            tool calls); the server refuses such requests otherwise.
    """

    ready: threading.Event
    rows: int
    constrains: bool

    @property
    def prefix(self) -> PrefixCache | None: ...

    def start(self) -> Scheduler:
        """Starts the worker thread; returns the scheduler."""
        ...

    def stop(self) -> None:
        """Stops the worker thread (jobs still running are abandoned)."""
        ...

    def submit(self, req: GenRequest, events: queue.Queue | None = None, index: int = 0) -> Job:
        """Queues a request; its `Job` receives the events (see `Job`)."""
        ...

    def pending(self) -> int:
        """Jobs waiting for a row."""
        ...

    def running(self) -> int:
        """Jobs being decoded now."""
        ...
