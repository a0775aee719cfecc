"""Prefix cache: decoding caches of earlier prompts, reused by prompts that share a prefix.

A chat's next turn repeats the whole conversation so far, and many requests share one
system prompt: their common prefix need not be prefilled again. Each entry is a batch-1
decoding cache (`CausalLM.init_cache(1, S)` layout) after `tokens`, stored when a prompt
has been prefilled and when a request ends (prompt + reply). A lookup finds the entry
with the longest common prefix; the caller prefills only the rest. Positions past the
shared prefix hold the entry's own later tokens, which the new prompt's prefill
overwrites and the causal mask hides until then.

A model whose cache holds a running state besides its per-position keys and values (the
hybrid block's convolution state) can reuse an entry only as a whole: its state is that
of the entry's last token (`exact_only`). Entries are evicted least recently used, within
a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import tensorflow as tf


class PrefixCache:
    """Least-recently-used decoding caches of token prefixes.

    Args:
        budget_bytes: most bytes of cache entries kept (0: the cache is off).
        exact_only: reuse an entry only when all of its tokens are a prefix of the
            prompt (models with a running state in their cache).
        min_tokens: shortest shared prefix worth reusing.

    Examples:

    >>> cache = PrefixCache(budget_bytes=1 << 20)
    >>> cache.store([1, 2, 3, 4], [{"k": tf.zeros((1, 8, 2))}])
    >>> length, entry = cache.lookup([1, 2, 3, 9, 9])
    >>> length
    3
    """

    def __init__(self, budget_bytes: int, exact_only: bool = False, min_tokens: int = 1):
        self.budget_bytes = int(budget_bytes)
        self.exact_only = exact_only
        self.min_tokens = max(int(min_tokens), 1)
        self._entries: OrderedDict[tuple, tuple[np.ndarray, list, int]] = OrderedDict()
        self._by_head: dict[tuple, set] = {}  # entries by their first `min_tokens` tokens
        self.bytes = 0
        self.queried_tokens = 0  # statistics: prompt tokens looked up / found
        self.hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(cache) -> int:
        return sum(int(np.prod(t.shape)) * t.dtype.size for t in tf.nest.flatten(cache))

    def store(self, tokens, cache, namespace: int = 0) -> None:
        """Keeps `cache` (batch 1) as the state after `tokens`; only lookups in the same
        `namespace` (a served LoRA adapter: its keys and values differ) find it."""
        if not self.enabled or len(tokens) < self.min_tokens:
            return
        tokens = tuple(int(t) for t in tokens)
        key = (namespace, tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = self._size(cache)
        if size > self.budget_bytes:
            return
        while self.bytes + size > self.budget_bytes:
            old, (_, _, freed) = self._entries.popitem(last=False)
            self._by_head[(old[0], old[1][: self.min_tokens])].discard(old)
            self.bytes -= freed
        self._entries[key] = (np.asarray(tokens, np.int64), cache, size)
        self._by_head.setdefault((namespace, tokens[: self.min_tokens]), set()).add(key)
        self.bytes += size

    def lookup(self, prompt, namespace: int = 0) -> tuple[int, list | None]:
        """`(length, cache)`: the longest prefix of `prompt` stored in `namespace` shorter
        than the prompt (its last token must still run to give the next logits), or
        `(0, None)`."""
        if not self.enabled:
            return 0, None
        prompt = np.asarray(prompt, np.int64)
        limit = len(prompt) - 1
        self.queried_tokens += len(prompt)
        best, best_key = 0, None
        head = (namespace, tuple(int(t) for t in prompt[: self.min_tokens]))
        for key in self._by_head.get(head, ()):  # a hit shares at least these tokens
            tokens = self._entries[key][0]
            n = min(len(tokens), limit)
            if n <= best:
                continue
            differs = np.flatnonzero(tokens[:n] != prompt[:n])
            shared = int(differs[0]) if len(differs) else n
            if self.exact_only and shared < len(tokens):
                continue
            if shared > best:
                best, best_key = shared, key
        if best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hit_tokens += best
        return best, self._entries[best_key][1]

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens that came from the cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
