"""Prometheus metrics of one server (the `prometheus-client` library).

Each `ServingApp` owns a `ServerMetrics` with its own registry (two servers in one
process never share counters). `GET /metrics` answers `render()` in Prometheus' text
format. The HTTP handler counts requests by endpoint and status; the scheduler records
queue depth, running rows, token counts, latencies, prefix-cache and speculative
decoding figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "deepseek_tf"
# Latency buckets (seconds): a millisecond decode step up to a minute-long request.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """The server's counters, gauges and histograms.

    Args:
        model_name: the served model id (a label on every series, as vLLM does).

    Examples:

    >>> m = ServerMetrics("tiny")
    >>> m.request("/health", 200)
    >>> b"deepseek_tf_requests_total" in m.render()[0]
    True
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, label = self.registry, ["model"]

        def counter(name, doc, extra=()):
            return Counter(f"{PREFIX}_{name}", doc, [*label, *extra], registry=r)

        def histogram(name, doc):
            return Histogram(
                f"{PREFIX}_{name}", doc, label, buckets=LATENCY_BUCKETS, registry=r
            ).labels(model_name)

        requests = counter("requests", "HTTP requests answered", ("endpoint", "status"))
        self._requests = requests
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens admitted").labels(model_name)
        self.generated_tokens = counter("generation_tokens", "tokens generated").labels(model_name)
        self.finished = counter("finished_requests", "generations ended", ("reason",))
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "requests waiting for a slot", label, registry=r
        ).labels(model_name)
        self.running_rows = Gauge(
            f"{PREFIX}_running_rows", "rows decoding now", label, registry=r
        ).labels(model_name)
        self.ttft = histogram("time_to_first_token_seconds", "arrival to first token")
        self.inter_token = histogram("inter_token_latency_seconds", "time between tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "arrival to last token")
        self.prefix_queried = counter(
            "prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache"
        ).labels(model_name)
        self.prefix_hit = counter(
            "prefix_cache_hit_tokens", "prompt tokens found in the prefix cache"
        ).labels(model_name)
        self.spec_drafted = counter(
            "spec_draft_tokens", "speculative tokens drafted, by draft position", ("position",)
        )
        self.spec_accepted = counter(
            "spec_accepted_tokens", "speculative tokens accepted, by draft position", ("position",)
        )

    def request(self, endpoint: str, status: int) -> None:
        """Counts one answered request."""
        self._requests.labels(self.model_name, endpoint, str(int(status))).inc()

    def finish(self, reason: str) -> None:
        self.finished.labels(self.model_name, reason).inc()

    def speculation(self, drafted: int, accepted: int) -> None:
        """One speculative round: `drafted` tokens proposed, the first `accepted` kept."""
        for position in range(1, drafted + 1):
            self.spec_drafted.labels(self.model_name, str(position)).inc()
            if position <= accepted:
                self.spec_accepted.labels(self.model_name, str(position)).inc()

    def speculation_counts(self, drafted, accepted) -> None:
        """Adds per-position totals: `drafted[i]`, `accepted[i]` of the `i+1`-th draft."""
        for i, (d, a) in enumerate(zip(drafted, accepted), start=1):
            if d:
                self.spec_drafted.labels(self.model_name, str(i)).inc(int(d))
            if a:
                self.spec_accepted.labels(self.model_name, str(i)).inc(int(a))

    def render(self) -> tuple[bytes, str]:
        """`(body, content_type)` of `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
