"""OpenAI response shapes: choices, logprobs and usage of completions and chats.

Completions report logprobs in the legacy shape (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`); chats in the `{"content": [{token, logprob,
bytes, top_logprobs}]}` shape. Logprobs are the model's log-softmax of the raw
logits (before temperature and top-p), of the token that was chosen.

Extension (deepseek-tf): next to the logprobs, each token's uncertainty -- the entropy
in nats of the model's distribution at that position -- as `token_entropies` (a list
parallel to `token_logprobs`) in completions and `entropy` on each chat `content` item.

`usage` reports `prompt_tokens_details.cached_tokens` (prompt tokens served from the prefix
cache) as OpenAI does. Extension (as llama.cpp's server): `timings` beside `usage` in every
response (and on the last chunk of a stream): `queue_ms` (arrival to admission), `ttft_ms`
(arrival to the first token), `total_ms`, the token counts and `tokens_per_second` (decode
speed after the first token); a figure the scheduler did not record is null.
"""

from __future__ import annotations

import time

from deepseek_tf.serving.job import Job
from deepseek_tf.serving.tool_calls import ToolCallStream, forced_calls, parse_tool_calls


def logprobs_completion(entries, offset: int) -> dict:
    """Legacy completions logprobs of `(id, text, logprob, alts, entropy)` entries from
    `offset`."""
    tokens, lps, tops, offsets, entropies = [], [], [], [], []
    for _, text, lp, alts, entropy in entries:
        tokens.append(text)
        lps.append(lp)
        tops.append(dict(alts) if alts else None)
        offsets.append(offset)
        entropies.append(entropy)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
        "token_entropies": entropies,  # extension: uncertainty in nats
    }


def logprobs_chat(entries) -> dict:
    """Chat logprobs (`{"content": [...]}`) of `(id, text, logprob, alts, entropy)` entries."""

    def item(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**item(t, lp), "top_logprobs": [item(a, b) for a, b in alts], "entropy": h}
            for _, t, lp, alts, h in entries
        ]
    }


def usage(jobs: list[Job]) -> dict:
    """Token counts of a request's finished jobs (its `n` choices share the prompt)."""
    p, c = len(jobs[0].req.prompt_ids), sum(len(job.tokens) for job in jobs)
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": int(jobs[0].cached_tokens)},
    }


def _ms(start, end) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000, 3)


def timings(job: Job) -> dict:
    """Where a finished job's time went (milliseconds; None where not recorded)."""
    started, first = job.started, job.first_token_at
    finished = job.finished_at or time.perf_counter()
    n = len(job.tokens)
    decode_s = None if first is None else finished - first
    speed = (n - 1) / decode_s if decode_s and n > 1 else None
    return {
        "queue_ms": _ms(started, job.admitted_at),
        "ttft_ms": _ms(started, first),
        "total_ms": _ms(started, finished),
        "prompt_tokens": int(job.prompt_tokens),
        "cached_tokens": int(job.cached_tokens),
        "completion_tokens": n,
        "tokens_per_second": None if speed is None else round(speed, 3),
    }


def chat_message(job: Job, text: str, reason):
    """`(message, finish_reason)` of a whole chat reply: its text, or with tools its content
    and `tool_calls` (the reason becomes `"tool_calls"` when the model called one)."""
    tools = job.req.tools
    if tools is None or not tools.parses:
        return {"role": "assistant", "content": text}, reason
    if tools.forced:
        content, calls = None, forced_calls(tools, text)
    else:
        content, calls = parse_tool_calls(text)
    if not calls:
        return {"role": "assistant", "content": text}, reason
    message = {"role": "assistant", "content": content, "tool_calls": calls}
    return message, "tool_calls" if reason == "stop" else reason


def choice(job: Job, text: str, entries, reason, offset: int = 0) -> dict:
    """One (non-delta) choice: a completion's `text` or a chat's `message`."""
    req = job.req
    if req.kind == "chat":
        lp = logprobs_chat(entries) if req.logprobs is not None else None
        message, reason = chat_message(job, text, reason)
        return {"index": job.index, "message": message, "logprobs": lp, "finish_reason": reason}
    lp = logprobs_completion(entries, offset) if req.logprobs is not None else None
    return {"index": job.index, "text": text, "logprobs": lp, "finish_reason": reason}


def completion_body(results, rid: str, model: str) -> dict:
    """The whole (non-streamed) response of a completion or chat request from its choices'
    `(job, text, entries, finish_reason)`; `timings` are the first choice's."""
    first = results[0][0]
    prefix = first.req.prompt if first.req.echo and first.req.prompt else ""
    choices = [choice(job, prefix + text, entries, reason, len(prefix))
               for job, text, entries, reason in results]  # fmt: skip
    return {
        "id": rid,
        "object": "chat.completion" if first.req.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage([job for job, *_ in results]),
        "timings": timings(first),
    }


class StreamChunks:
    """The server-sent event payloads of one streamed request, in order.

    `opening` (chat: the assistant role; completion with `echo`: the prompt; else
    None), one `delta(text, entries)` per batch of new tokens, then `closing(reason)`:
    the finish reason with `timings`. One per choice of a request (`n`); after the
    last, `usage_chunk` (with `stream_options.include_usage`) and `[DONE]`. A chat with
    tools streams its content as it comes and each tool call whole once complete
    (`ToolCallStream`); a forced call (`tool_choice` required or named) goes out at the
    close.
    """

    def __init__(self, job: Job, rid: str, model: str):
        self.job, self.chat = job, job.req.kind == "chat"
        self.base = {
            "id": rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self.offset = 0
        tools = job.req.tools if self.chat else None
        self.tools = tools if tools is not None and tools.parses else None
        self.calls = ToolCallStream() if self.tools is not None else None
        self.forced_text = ""
        self.opening = None
        if self.chat:
            self.opening = self._chat_chunk({"role": "assistant", "content": ""}, None, None)
        elif job.req.echo and job.req.prompt:
            self.opening = {**self.base, "choices": [choice(job, job.req.prompt, [], None)]}

    def _chat_chunk(self, delta: dict, logprobs, reason) -> dict:
        item = {"index": self.job.index, "delta": delta, "logprobs": logprobs,
                "finish_reason": reason}  # fmt: skip
        return {**self.base, "choices": [item]}

    def delta(self, text: str, entries) -> dict:
        if self.chat:
            lp = logprobs_chat(entries) if self.job.req.logprobs is not None else None
            if self.tools is None:
                return self._chat_chunk({"content": text}, lp, None)
            if self.tools.forced:
                self.forced_text += text
                return self._chat_chunk({}, lp, None)
            content, calls = self.calls.feed(text)
            delta = {"content": content} if content else {}
            return self._chat_chunk({**delta, "tool_calls": calls} if calls else delta, lp, None)
        item = choice(self.job, text, entries, None, self.offset)
        self.offset += len(text)
        return {**self.base, "choices": [item]}

    def _tool_tail(self) -> tuple[list, bool]:
        """Chunks still owed at the close of a chat with tools, and whether it called one."""
        if self.tools.forced:
            calls = forced_calls(self.tools, self.forced_text)
            items = [{"index": i, **c} for i, c in enumerate(calls)]
            if items:
                return [self._chat_chunk({"tool_calls": items}, None, None)], True
            tail = self.forced_text
        else:
            tail = self.calls.close()
        return ([self._chat_chunk({"content": tail}, None, None)] if tail else []), (
            not self.tools.forced and self.calls.called
        )

    def closing(self, reason: str) -> list:
        owed = []
        if self.tools is not None:
            owed, called = self._tool_tail()
            reason = "tool_calls" if called and reason == "stop" else reason
        if self.chat:
            last = self._chat_chunk({}, None, reason)
        else:
            last = {**self.base, "choices": [choice(self.job, "", [], reason, self.offset)]}
        return [*owed, {**last, "timings": timings(self.job)}]

    def usage_chunk(self, jobs: list[Job]) -> dict:
        """The usage of all of the request's choices (`stream_options.include_usage`)."""
        return {**self.base, "choices": [], "usage": usage(jobs), "timings": timings(jobs[0])}
