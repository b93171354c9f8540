"""
Totals since the daemon started, from its Prometheus metrics.

With workers the metrics are kept in multiprocess mode, and reading them
sums every worker's samples (:mod:`oproxy.metrics`): the console's totals
are the same whichever worker answers.  Reading them then means parsing
every worker's files (tens of milliseconds), so it is done in a thread,
every couple of seconds while the console is in use, and an answer takes
the last reading rather than waiting for the next; a single process reads
its own, in memory, when asked.

The metrics' labels bound what can be said: requests by model, backend
and status, durations by route only, time to the first token by model,
tokens by model and key.  What a label does not hold is left out rather
than guessed.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oproxy.console.follow import FIRST_WAIT, IDLE_SECONDS, first_of
from oproxy.metrics import MULTIPROCESS_ENV, Metrics

log = Logger()

#: Seconds a reading of the metrics is reused.
FRESH_SECONDS = 2.0
#: Routes that are not traffic: the console's own.
_CONSOLE_ROUTE = "/ui"


def samples(metrics: Metrics) -> Iterable[Metric]:
    """Every metric of every process."""
    if metrics.registry is not None:
        return metrics.registry.collect()
    return MultiProcessCollector(None, path=os.environ[MULTIPROCESS_ENV]).collect()  # type: ignore[no-any-return]


def quantile(buckets: Mapping[float, float], fraction: float) -> float | None:
    """
    The ``fraction`` quantile of cumulative histogram buckets (upper bound
    → count), interpolated within its bucket as Prometheus'
    ``histogram_quantile`` does.
    """
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = fraction * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _group() -> dict[str, float]:
    return defaultdict(float)


class Totals:
    """
    What the metrics say since the start.

    :param metrics: the process's metrics.
    :param in_thread: runs the reading of every worker's files.
    """

    def __init__(
        self,
        metrics: Metrics,
        clock: IReactorTime,
        in_thread: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._in_thread = in_thread
        self._read_at = -math.inf
        self._used = -math.inf
        self._last: dict[str, Any] | None = None
        self._reading: defer.Deferred[None] | None = None
        self._loop: task.LoopingCall | None = None

    async def read(self, wait: float = FIRST_WAIT) -> dict[str, Any] | None:
        """
        The figures: read afresh in a single process; with workers, the
        last reading, which is renewed every couple of seconds while the
        console is in use.  Only the very first waits for one, ``wait``
        seconds at most (``None``: not read yet).
        """
        if self._metrics.registry is not None:
            return summarise(samples(self._metrics))
        self._used = self._clock.seconds()
        if self._loop is None:
            self._loop = task.LoopingCall(self._renew)
            self._loop.clock = self._clock
            self._loop.start(FRESH_SECONDS, now=True)
        if self._last is None and self._reading is not None:
            await first_of(self._reading, wait, self._clock)
        return self._last

    def _renew(self) -> None:
        if self._clock.seconds() - self._used > IDLE_SECONDS:
            self.stop()  # nobody looks: forget, and read again when asked
            return
        if self._reading is None:
            self._read_at = self._clock.seconds()
            self._reading = self._in_thread(_read_all, self._metrics)
            self._reading.addCallbacks(self._read, self._failed)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._last = None

    def _read(self, figures: dict[str, Any]) -> None:
        self._last, self._reading = figures, None

    def _failed(self, failure: Any) -> None:
        self._reading = None
        log.failure("Reading the metrics for the console", failure)


def _read_all(metrics: Metrics) -> dict[str, Any]:
    return summarise(samples(metrics))


def summarise(metrics: Iterable[Metric]) -> dict[str, Any]:
    """The console's figures from one reading of the metrics."""
    requests = {"requests": 0.0, "client_errors": 0.0, "errors": 0.0}
    by: dict[str, dict[str, dict[str, float]]] = {
        "model": defaultdict(_group),
        "key": defaultdict(_group),
        "backend": defaultdict(_group),
    }
    durations: dict[float, float] = defaultdict(float)
    first_tokens: dict[float, float] = defaultdict(float)
    first_tokens_by_model: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    tokens = {"prompt": 0.0, "completion": 0.0}
    backends: dict[str, dict[str, float]] = defaultdict(dict)
    in_flight = 0.0
    for metric in metrics:
        for sample in metric.samples:
            labels, value = sample.labels, sample.value
            if labels.get("route", "").startswith(_CONSOLE_ROUTE):
                continue
            if sample.name == "oproxy_requests_total":
                outcome = _outcome(labels.get("status", ""))
                requests["requests"] += value
                if outcome:
                    requests[outcome] += value
                for dimension in ("model", "backend"):
                    name = labels.get(dimension, "-")
                    if name != "-":
                        by[dimension][name]["requests"] += value
                        if outcome:
                            by[dimension][name][outcome] += value
            elif sample.name == "oproxy_request_duration_seconds_bucket":
                durations[float(labels["le"])] += value
            elif sample.name == "oproxy_time_to_first_token_seconds_bucket":
                first_tokens[float(labels["le"])] += value
                first_tokens_by_model[labels.get("model", "-")][float(labels["le"])] += value
            elif sample.name == "oproxy_tokens_total":
                direction = labels.get("direction", "")
                if direction not in tokens:
                    continue
                tokens[direction] += value
                for dimension in ("model", "key"):
                    name = labels.get(dimension, "-")
                    if name != "-":
                        by[dimension][name][f"{direction}_tokens"] += value
            elif sample.name == "oproxy_requests_in_flight":
                in_flight += value
            elif sample.name in ("oproxy_backend_up", "oproxy_backend_probe_latency_seconds"):
                name = labels.get("backend", "-")
                field = "up" if sample.name == "oproxy_backend_up" else "probe_latency_seconds"
                backends[name][field] = value
    for model, buckets in first_tokens_by_model.items():
        if model != "-":
            for fraction, field in ((0.5, "first_token_p50"), (0.95, "first_token_p95")):
                found = quantile(buckets, fraction)
                if found is not None:
                    by["model"][model][field] = found
    total = {
        "requests": int(requests["requests"]),
        "client_errors": int(requests["client_errors"]),
        "errors": int(requests["errors"]),
        "error_rate": requests["errors"] / requests["requests"] if requests["requests"] else None,
        "latency_p50": quantile(durations, 0.5),
        "latency_p95": quantile(durations, 0.95),
        "first_token_p50": quantile(first_tokens, 0.5),
        "first_token_p95": quantile(first_tokens, 0.95),
        "prompt_tokens": int(tokens["prompt"]),
        "completion_tokens": int(tokens["completion"]),
    }
    return {
        "total": total,
        **{f"by_{dimension}": _ranked(dimension, groups) for dimension, groups in by.items()},
        "in_flight": int(in_flight),
        "backends": {name: dict(values) for name, values in backends.items()},
    }


def _outcome(status: str) -> str | None:
    if status.startswith("5"):
        return "errors"
    if status.startswith("4") and status != "499":
        return "client_errors"
    return None


#: What the metrics' labels tell for each breakdown (the rest is unknown).
_KNOWN = {
    "model": ("requests", "tokens", "first_token"),
    "key": ("tokens",),
    "backend": ("requests",),
}


def _ranked(dimension: str, groups: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    known = _KNOWN[dimension]
    rows = []
    for name, values in groups.items():
        row: dict[str, Any] = {"name": name}
        requests = values.get("requests", 0.0)
        for field in ("requests", "client_errors", "errors"):
            row[field] = int(values.get(field, 0.0)) if "requests" in known else None
        row["error_rate"] = values.get("errors", 0.0) / requests if requests else None
        for field in ("prompt_tokens", "completion_tokens"):
            row[field] = int(values.get(field, 0.0)) if "tokens" in known else None
        for field in ("first_token_p50", "first_token_p95"):
            row[field] = values.get(field) if "first_token" in known else None
        row["latency_p50"] = row["latency_p95"] = None
        rows.append(row)
    rows.sort(
        key=lambda row: (-(row["requests"] or 0), -(row["completion_tokens"] or 0), row["name"])
    )
    return rows
