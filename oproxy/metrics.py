"""
Prometheus metrics, correct with one process or many.

With worker processes every worker writes its samples to files in a private
directory (``prometheus_client``'s multiprocess mode, switched on by
``PROMETHEUS_MULTIPROC_DIR`` in the worker's environment before it starts);
a scrape of any worker reads them all, so it shows totals over every worker,
never one worker's view.  The master makes the directory at start, marks
dead workers, and removes it at exit.

Labels are bounded: a route is one of ours, a model label is only kept for
answers a backend produced (a client may send any string as a model name),
a key label is a configured key's name.  Never a request id or a raw key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

#: Environment variable naming the directory shared by worker processes.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds: from a cache hit (sub-millisecond) to a long generation.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)
#: Seconds to the first token: a warm model answers in tens of milliseconds,
#: a cold load takes tens of seconds.
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120)

#: Seconds: the proxy's own work is measured in tenths of milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class Metric:
    """
    How one metric is made: the same arguments ``prometheus_client`` takes.

    :ivar mode: a gauge's ``multiprocess_mode``: how the samples of several
        processes add up (``livesum``, ``livemax``, ``livemin``).
    """

    kind: type[Counter | Gauge | Histogram]
    name: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] | None = None
    mode: str | None = None

    def build(self, registry: CollectorRegistry | None) -> Counter | Gauge | Histogram:
        options: dict[str, Any] = {}
        if self.buckets is not None:
            options["buckets"] = self.buckets
        if self.mode is not None:
            options["multiprocess_mode"] = self.mode
        return self.kind(self.name, self.help, self.labels, registry=registry, **options)


#: Every metric oproxy records, by the attribute of :class:`Metrics` that holds it.
METRICS: Final[Mapping[str, Metric]] = {
    "requests": Metric(
        Counter,
        "oproxy_requests",
        ("route", "model", "backend", "status"),
        "Requests answered, by route, model, backend and HTTP status "
        "(499: the client hung up before its answer was complete).",
    ),
    "duration": Metric(
        Histogram,
        "oproxy_request_duration_seconds",
        ("route",),
        "Time from the request to the end of its answer (the whole stream).",
        buckets=DURATION_BUCKETS,
    ),
    "overhead": Metric(
        Histogram,
        "oproxy_overhead_seconds",
        ("route",),
        "Time a request spent in the proxy itself, not waiting for an upstream.",
        buckets=OVERHEAD_BUCKETS,
    ),
    "first_token": Metric(
        Histogram,
        "oproxy_time_to_first_token_seconds",
        ("route", "model"),
        "Time from the request to the first streamed chunk.",
        buckets=FIRST_TOKEN_BUCKETS,
    ),
    "tokens": Metric(
        Counter,
        "oproxy_tokens",
        ("direction", "model", "key"),
        "Tokens counted by the backend, by direction (prompt, completion), model and key.",
    ),
    "in_flight": Metric(
        Gauge,
        "oproxy_requests_in_flight",
        (),
        "Requests being served now.",
        mode="livesum",
    ),
    "upstream_errors": Metric(
        Counter,
        "oproxy_upstream_errors",
        ("backend", "kind"),
        "Failures talking to a backend, by backend and kind.",
    ),
    "rejections": Metric(
        Counter,
        "oproxy_rejections",
        ("reason",),
        "Requests refused before reaching a backend, by reason (error code).",
    ),
    "cache": Metric(
        Counter,
        "oproxy_cache_requests",
        ("result",),
        "Response cache outcomes: hit, miss or bypass.",
    ),
    "backend_up": Metric(
        Gauge,
        "oproxy_backend_up",
        ("backend",),
        "Whether a backend answered its last health probe (1) or not (0).",
        mode="livemax",
    ),
    "backend_circuit_open": Metric(
        Gauge,
        "oproxy_backend_circuit_open",
        ("backend",),
        "Whether a backend is held back as down (1: its circuit is open) or not (0).",
        mode="livemax",
    ),
    "model_circuit_open": Metric(
        Gauge,
        "oproxy_model_circuit_open",
        ("backend", "model"),
        "Whether a model is held back on a backend because it keeps failing there (1) "
        "or not (0); only for models the backend lists.",
        mode="livemax",
    ),
    "probe_latency": Metric(
        Gauge,
        "oproxy_backend_probe_latency_seconds",
        ("backend",),
        "How long the last health probe of a backend took.",
        mode="livemax",
    ),
    "state_up": Metric(
        Gauge,
        "oproxy_state_store_up",
        (),
        "Whether the state store (keys, limits, quotas) answered its last use (1) or not (0).",
        mode="livemin",
    ),
    "state_errors": Metric(
        Counter,
        "oproxy_state_store_errors",
        ("operation",),
        "State store operations that failed, by operation.",
    ),
    "connections_open": Metric(
        Gauge,
        "oproxy_connections_open",
        (),
        "Client connections open now.",
        mode="livesum",
    ),
    "connections_refused": Metric(
        Counter,
        "oproxy_connections_refused",
        ("reason",),
        "Client connections closed at once because a cap was reached, by cap "
        "(max_connections, max_connections_per_client, descriptors).",
    ),
    "request_read_timeouts": Metric(
        Counter,
        "oproxy_request_read_timeouts",
        ("phase",),
        "Connections answered 408 and closed because the client did not send a "
        "request's head or body in time, by phase (head, body).",
    ),
    "plugin_failures": Metric(
        Counter,
        "oproxy_plugin_failures",
        ("plugin", "hook", "reason"),
        "Plugin hooks that failed or timed out, by plugin, hook and reason "
        "(error, timeout); each either refused its request or was passed over.",
    ),
    "webhook_dropped": Metric(
        Counter,
        "oproxy_webhook_dropped_records",
        ("url",),
        "Records a webhook plugin dropped, by its URL (without credentials or query): "
        "its queue was full (the oldest go), the URL refused them for good, or the "
        "process stopped before they were delivered.",
    ),
}


class Metrics:
    """
    Every metric oproxy records (:data:`METRICS`), on an injected registry.

    :param registry: where single-process metrics live; ``None`` in
        multiprocess mode, where the files in the shared directory are the
        source and a scrape builds its own registry over them.
    """

    requests: Counter
    duration: Histogram
    overhead: Histogram
    first_token: Histogram
    tokens: Counter
    in_flight: Gauge
    upstream_errors: Counter
    rejections: Counter
    cache: Counter
    backend_up: Gauge
    backend_circuit_open: Gauge
    model_circuit_open: Gauge
    probe_latency: Gauge
    state_up: Gauge
    state_errors: Counter
    connections_open: Gauge
    connections_refused: Counter
    request_read_timeouts: Counter
    plugin_failures: Counter
    webhook_dropped: Counter

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self._collectors: list[Any] = []
        for attribute, metric in METRICS.items():
            setattr(self, attribute, metric.build(registry))

    def add_collector(self, collector: Any) -> None:
        """
        A collector computed when scraped, from files every process reads
        (certificate expiry), so each worker's scrape says the same.
        """
        self._collectors.append(collector)
        if self.registry is not None:
            self.registry.register(collector)

    def count_tokens(self, usage: Mapping[str, int], *, model: str, key: str | None) -> None:
        key_label = key or "-"
        self.tokens.labels("prompt", model, key_label).inc(usage.get("prompt_tokens", 0))
        self.tokens.labels("completion", model, key_label).inc(usage.get("completion_tokens", 0))

    def scrape(self) -> bytes:
        """The text exposition of every process's metrics."""
        if self.registry is not None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=os.environ[MULTIPROCESS_ENV])
        for collector in self._collectors:
            registry.register(collector)
        return generate_latest(registry)


def metrics_for_this_process() -> Metrics:
    """
    Metrics in the mode this process was started in.

    The composition root calls this once per process.
    """
    if os.environ.get(MULTIPROCESS_ENV):
        return Metrics(None)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return Metrics(registry)
