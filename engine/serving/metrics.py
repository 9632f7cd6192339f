"""``GET /metrics`` in the Prometheus text format (``prometheus_client``, in the ``serve`` extra).

Each app has its own registry (several servers in one process, as in the tests, do not share counts):
requests by endpoint and status, prompt and generated tokens, queue depth and busy slots (read from
the scheduler at scrape time), rows per decode step, time to first token and request latency.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ENDPOINTS", "Metrics"]

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, scheduler: Any):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("layerfold_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("layerfold_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("layerfold_generation_tokens", "tokens generated", registry=r)
        Gauge("layerfold_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: scheduler.stats()["queued"])
        Gauge("layerfold_active_requests", "requests holding a slot", registry=r).set_function(
            lambda: scheduler.stats()["active"])
        self.batch = Histogram("layerfold_batch_size", "rows served by each decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("layerfold_time_to_first_token_seconds", "submit to first generated token",
                              buckets=_SECONDS, registry=r)
        self.latency = Histogram("layerfold_request_latency_seconds", "submit to last token, per prompt",
                                 buckets=_SECONDS, registry=r)
        scheduler.on_step = self.batch.observe

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def finished(self, prompt_tokens: int, completion_tokens: int, ttft_s: float | None, latency_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.latency.observe(latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
