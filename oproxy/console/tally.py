"""
The last hour of traffic, kept per minute: pure arithmetic over access log
records.

A :class:`TrafficTally` takes records and keeps per-minute tallies for the
last hour (requests, statuses, latency and time to the first token as
log-spaced histograms, tokens), broken down by model, key and backend, plus
the most recent records.  Answering from it costs a pass over sixty
minutes, never over the lines.  :mod:`oproxy.console.follow` feeds it from
the file every worker writes, so every worker tells the same story.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Minutes of history kept.
WINDOW_MINUTES = 60
#: Records kept for the requests page (newest last).
RECENT_RECORDS = 1000
#: Distinct models (keys, backends) tallied per minute; the rest are "(other)".
DISTINCT_PER_MINUTE = 100
OTHER = "(other)"
#: Paths not counted as traffic: the console's own requests.
CONSOLE_PREFIX = "/ui/"

#: Histogram buckets: 20% apart, from a millisecond to about an hour.
_FIRST_BUCKET = 0.001
_RATIO = 1.2
_LAST_BUCKET = 90

DIMENSIONS = ("model", "key", "backend")


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration."""
    if seconds <= _FIRST_BUCKET:
        return 0
    return min(_LAST_BUCKET, math.ceil(math.log(seconds / _FIRST_BUCKET, _RATIO)))


def bucket_seconds(index: int) -> float:
    """A bucket's upper bound, in seconds: what a percentile reports."""
    return float(_FIRST_BUCKET * _RATIO**index)


def percentile(counts: Mapping[int, int], fraction: float) -> float | None:
    """The ``fraction`` quantile (0.5, 0.95) of a bucket histogram, within 20%."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = fraction * total
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return bucket_seconds(index)
    return bucket_seconds(max(counts))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def seconds_of(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


@dataclass
class Tally:
    """Requests, outcomes, tokens and timings of a set of records."""

    requests: int = 0
    client_errors: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: Counter[int] = field(default_factory=Counter)
    first_token: Counter[int] = field(default_factory=Counter)

    def add(
        self,
        status: int,
        latency: float | None,
        first_token: float | None,
        prompt: int,
        completion: int,
    ) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        elif status >= 400 and status != 499:
            self.client_errors += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if latency is not None:
            self.latency[bucket_of(latency)] += 1
        if first_token is not None:
            self.first_token[bucket_of(first_token)] += 1

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.client_errors += other.client_errors
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.latency.update(other.latency)
        self.first_token.update(other.first_token)

    def summary(self) -> dict[str, Any]:
        """The tally as the console's JSON reports it (seconds, counts, rates)."""
        return {
            "requests": self.requests,
            "client_errors": self.client_errors,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "latency_p50": percentile(self.latency, 0.5),
            "latency_p95": percentile(self.latency, 0.95),
            "first_token_p50": percentile(self.first_token, 0.5),
            "first_token_p95": percentile(self.first_token, 0.95),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class Minute:
    """One minute's tallies: all of it, and by model, key and backend."""

    total: Tally = field(default_factory=Tally)
    by: dict[str, dict[str, Tally]] = field(
        default_factory=lambda: {dimension: {} for dimension in DIMENSIONS}
    )


@dataclass(frozen=True)
class Filters:
    """What the requests page asks for: ``None`` is any."""

    key: str | None = None
    model: str | None = None
    status: str | None = None

    def keeps(self, record: Mapping[str, Any]) -> bool:
        if self.key is not None and (record.get("key") or "-") != self.key:
            return False
        if self.model is not None and (record.get("model") or "-") != self.model:
            return False
        if self.status:
            status = str(record.get("status", ""))
            wanted = self.status.lower()
            if wanted.endswith("xx"):
                return status[:1] == wanted[:1]
            return status == wanted
        return True


def summary_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as the lists show it: everything but the bodies."""
    return {k: v for k, v in record.items() if k not in ("request_body", "response_body")}


class TrafficTally:
    """
    Per-minute tallies of the last hour, the latest records, and when each
    key was last seen.  Pure: no clock, no file; the caller says what time
    it is.
    """

    def __init__(self, window: int = WINDOW_MINUTES, recent: int = RECENT_RECORDS) -> None:
        self.window = window
        self._minutes: dict[int, Minute] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        #: Request id → record, for the records still in ``_recent``.
        self._by_id: dict[str, dict[str, Any]] = {}
        self.last_used: dict[str, float] = {}
        self.models: set[str] = set()
        self.keys: set[str] = set()
        self.records = 0
        self._newest_minute = 0

    def add(self, record: Mapping[str, Any]) -> None:
        """One access log record (anything else is ignored)."""
        path = record.get("path")
        started = seconds_of(record.get("time"))
        status = record.get("status")
        if (
            started is None
            or not isinstance(status, int)
            or (isinstance(path, str) and path.startswith(CONSOLE_PREFIX))
        ):
            return
        self.records += 1
        latency = seconds_of(record.get("latency_seconds"))
        ended = started + (latency or 0.0)
        key = record.get("key") if isinstance(record.get("key"), str) else None
        model = record.get("model") if isinstance(record.get("model"), str) else None
        backend = record.get("backend") if isinstance(record.get("backend"), str) else None
        if key is not None:
            self.keys.add(key)
            if ended > self.last_used.get(key, 0.0):
                self.last_used[key] = ended
        if model is not None and model != "-":
            self.models.add(model)
        self._remember(dict(record))
        number = int(ended // 60)
        if number <= self._newest_minute - self.window:
            return  # older than the window: listed, not tallied
        if number > self._newest_minute:
            self._newest_minute = number
            self._prune()
        minute = self._minutes.get(number)
        if minute is None:
            minute = self._minutes[number] = Minute()
        numbers = (
            status,
            latency,
            seconds_of(record.get("first_token_seconds")),
            _int(record.get("prompt_tokens")),
            _int(record.get("completion_tokens")),
        )
        minute.total.add(*numbers)
        for dimension, value in (("model", model), ("key", key), ("backend", backend)):
            if value is None or value == "-":
                continue
            tallies = minute.by[dimension]
            tally = tallies.get(value)
            if tally is None:
                if len(tallies) >= DISTINCT_PER_MINUTE:
                    value = OTHER
                tally = tallies.setdefault(value, Tally())
            tally.add(*numbers)

    def _remember(self, record: dict[str, Any]) -> None:
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            if self._by_id.get(oldest.get("request_id", "")) is oldest:
                del self._by_id[oldest["request_id"]]
        self._recent.append(record)
        request_id = record.get("request_id")
        if isinstance(request_id, str):
            self._by_id[request_id] = record

    def _prune(self) -> None:
        oldest = self._newest_minute - self.window
        for number in [n for n in self._minutes if n <= oldest]:
            del self._minutes[number]

    # -- what the console asks -----------------------------------------------------

    def _window(self, now: float) -> Iterator[tuple[int, Minute | None]]:
        current = int(now // 60)
        for number in range(current - self.window + 1, current + 1):
            yield number, self._minutes.get(number)

    def series(self, now: float) -> list[dict[str, Any]]:
        """One entry a minute, oldest first, for the last hour up to ``now``."""
        series = []
        for number, minute in self._window(now):
            tally = minute.total if minute is not None else Tally()
            series.append({"minute": number * 60, **tally.summary()})
        return series

    def hour(self, now: float) -> dict[str, Any]:
        """The last hour, in all and by model, key and backend, busiest first."""
        total = Tally()
        by: dict[str, dict[str, Tally]] = {dimension: {} for dimension in DIMENSIONS}
        for _, minute in self._window(now):
            if minute is None:
                continue
            total.merge(minute.total)
            for dimension, tallies in minute.by.items():
                merged = by[dimension]
                for name, tally in tallies.items():
                    merged.setdefault(name, Tally()).merge(tally)
        return {
            "total": total.summary(),
            **{f"by_{dimension}": ranked(tallies) for dimension, tallies in by.items()},
        }

    def recent(self, filters: Filters = Filters(), limit: int = 50) -> list[dict[str, Any]]:
        """The latest records that pass ``filters``, newest first, without bodies."""
        found = []
        for record in reversed(self._recent):
            if filters.keeps(record):
                found.append(summary_of(record))
                if len(found) >= limit:
                    break
        return found

    def find(self, request_id: str) -> dict[str, Any] | None:
        """A recent request's whole record (with its bodies, if they were logged)."""
        return self._by_id.get(request_id)


def ranked(tallies: Mapping[str, Tally]) -> list[dict[str, Any]]:
    return [
        {"name": name, **tally.summary()}
        for name, tally in sorted(tallies.items(), key=lambda item: (-item[1].requests, item[0]))
    ]
