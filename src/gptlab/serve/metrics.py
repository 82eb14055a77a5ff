"""GET /metrics: Prometheus text from prometheus_client, one CollectorRegistry per app (so several apps in one
process, as in the tests, keep their own counts).

    gptlab_http_requests_total{endpoint, code}     HTTP requests answered, by endpoint and status code
    gptlab_generations_total{reason}               engine requests ended: stop, length, cancelled, timeout, error
                                                   (a stop string or a client gone cancels; n choices: n requests)
    gptlab_prompt_tokens_total, gptlab_cached_tokens_total, gptlab_completion_tokens_total
    gptlab_queue_length, gptlab_active_requests    waiting for a slot / in the running batch, now
    gptlab_batch_size                              histogram: requests advanced by each decode pass
    gptlab_time_to_first_token_seconds             histogram: submitted -> first token (queue wait and prefill)
    gptlab_request_latency_seconds                 histogram: submitted -> last token

The engine counts in plain numbers and calls EngineStats.on_step / on_done on its own thread; the hooks
here turn them into Prometheus samples (prometheus_client is thread-safe).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptlab.serve.engine import DoneEvent, Handle
from gptlab.serve.registry import Registry

# The endpoints counted by name; any other path counts as "other" (a label per random path would grow forever).
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/api/"):
        return "/api"
    if path == "/" or path == "/runs" or path.startswith("/runs/") or path.startswith("/static/"):
        return "pages"
    return "other"


class Metrics:
    """The app's Prometheus metrics, fed by the HTTP middleware (requests) and the engines' hooks (the rest)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.prometheus = r = CollectorRegistry()
        self.http_requests = Counter("gptlab_http_requests", "HTTP requests answered, by endpoint and status code",
                                     ["endpoint", "code"], registry=r)
        self.generations = Counter("gptlab_generations", "generation requests the engines ended, by how they ended",
                                   ["reason"], registry=r)
        self.prompt_tokens = Counter("gptlab_prompt_tokens", "prompt tokens of the generation requests", registry=r)
        self.cached_tokens = Counter("gptlab_cached_tokens", "prompt tokens found in a slot's cache (not run again)",
                                     registry=r)
        self.completion_tokens = Counter("gptlab_completion_tokens", "tokens generated", registry=r)
        queue = Gauge("gptlab_queue_length", "generation requests waiting for a slot", registry=r)
        queue.set_function(lambda: sum(m.engine.queue_length for m in self._loaded()))
        active = Gauge("gptlab_active_requests", "generation requests in the running batches", registry=r)
        active.set_function(lambda: sum(m.engine.active for m in self._loaded()))
        self.batch_size = Histogram("gptlab_batch_size", "requests advanced by one decode pass", buckets=BATCH, registry=r)
        self.ttft = Histogram("gptlab_time_to_first_token_seconds", "time from submission to the first token",
                              buckets=SECONDS, registry=r)
        self.latency = Histogram("gptlab_request_latency_seconds", "time from submission to the end of a generation",
                                 buckets=SECONDS, registry=r)
        registry.stats.on_step = self.batch_size.observe
        registry.stats.on_done = self._on_done

    def _loaded(self):
        return list(self.registry.loaded.values())  # a copy: a model may be loading meanwhile

    def _on_done(self, handle: Handle, done: DoneEvent) -> None:
        self.generations.labels(done.reason).inc()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.cached_tokens.inc(done.cached_tokens)
        self.completion_tokens.inc(done.completion_tokens)
        if handle.first_token_at is not None:
            self.ttft.observe(handle.first_token_at - handle.submitted)
        self.latency.observe(time.monotonic() - handle.submitted)

    def count_request(self, path: str, code: int) -> None:
        self.http_requests.labels(endpoint_label(path), str(code)).inc()

    def text(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.prometheus), CONTENT_TYPE_LATEST
