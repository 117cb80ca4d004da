"""The server's Prometheus metrics (`prometheus_client`), in a registry of their own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests, tokens (prompt, of which from the KV cache, and generated), queue depth, running rows, time to
    first token and per-token latency."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("llamacli_http_requests", "HTTP requests answered, by route and status",
                                     ["route", "status"], registry=r)
        self.finished = Counter("llamacli_requests_finished", "Generations ended, by finish reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("llamacli_prompt_tokens", "Prompt tokens of the generations admitted",
                                     registry=r)
        self.cached_prompt_tokens = Counter(
            "llamacli_prompt_tokens_cached", "Prompt tokens taken from the KV cache (a prefix another request left "
            "there) instead of prefilled", registry=r)
        self.generation_tokens = Counter("llamacli_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("llamacli_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("llamacli_running_rows", "Batch rows generating now", registry=r)
        self.ttft = Histogram("llamacli_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("llamacli_time_per_output_token_seconds", "Between a row's tokens",
                                   buckets=LATENCY_BUCKETS, registry=r)

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
