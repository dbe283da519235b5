"""Prometheus metrics of ``llara serve`` (prometheus-client), served at ``GET /metrics``.

=======================================  =========  ===================================================
name                                     type       what
=======================================  =========  ===================================================
``llara_http_requests_total``            counter    requests answered, by ``route``, ``method``, ``status``
``llara_http_request_duration_seconds``  histogram  time from request to the end of the response, by
                                                    ``route`` and ``method``
``llara_queue_depth``                    gauge      search queries and embedding inputs admitted and not
                                                    answered yet (new requests get 429 past
                                                    ``llara_queue_limit``)
``llara_queue_limit``                    gauge      ``--max-pending``
``llara_batch_texts``                    histogram  texts (search queries + embedding inputs) per micro-batch
``llara_batch_tokens``                   histogram  tokens the encoder ran per micro-batch (prompt included)
``llara_encoder_duration_seconds``       histogram  seconds per encoder call (``Encoder.last_stats.seconds``)
``llara_ready``                          gauge      1 once the model (and index) are loaded, else 0
=======================================  =========  ===================================================

``route`` is the route's path template (``/v1/models/{model}``), or ``other`` for paths the service
does not serve, and ``method`` one of the standard methods or ``other``, so that a client probing
random paths or methods cannot grow the label set. Each app gets its
own registry (no global state: tests build many apps in one process).
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "MetricsMiddleware"]

_POWERS_OF_2 = tuple(float(2**i) for i in range(11))  # 1 .. 1024 texts
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 19))  # 16 .. 262,144 tokens
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The service's metrics in their own registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llara_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("llara_http_request_duration_seconds",
                                 "seconds from a request's arrival to the end of its response",
                                 ["route", "method"], buckets=_SECONDS, registry=r)
        self.queue_depth = Gauge("llara_queue_depth", "search queries and embedding inputs admitted and not "
                                 "answered yet", registry=r)
        self.queue_limit = Gauge("llara_queue_limit", "queue depth beyond which new requests get 429 "
                                 "(--max-pending)", registry=r)
        self.batch_texts = Histogram("llara_batch_texts", "texts (search queries + embedding inputs) per "
                                     "micro-batch", buckets=_POWERS_OF_2, registry=r)
        self.batch_tokens = Histogram("llara_batch_tokens", "tokens the encoder ran per micro-batch (each text "
                                      "in its prompt)", buckets=_TOKEN_BUCKETS, registry=r)
        self.encoder_seconds = Histogram("llara_encoder_duration_seconds", "seconds per encoder call",
                                         buckets=_SECONDS, registry=r)
        self.ready = Gauge("llara_ready", "1 once the model (and index) are loaded", registry=r)

    def watch_queue(self, depth: Callable[[], float], limit: int) -> None:
        """Read the queue depth from ``depth()`` at each scrape."""
        self.queue_depth.set_function(depth)
        self.queue_limit.set(limit)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting and timing every HTTP request; ``route_of(path)`` names its route."""

    def __init__(self, app, metrics: Metrics, route_of: Callable[[str], str]):
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            method = scope.get("method", "")
            route, method = self.route_of(scope["path"]), method if method in _METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - t0)
