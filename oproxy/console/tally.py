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
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
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


def _count(value: Any) -> int:
    kind = type(value)
    return value if (kind is int) and value > 0 else 0


def seconds_of(value: Any) -> float | None:
    kind = type(value)
    if (kind is float or kind is int) and value >= 0:
        return float(value)
    return None


#: Outcomes, as :meth:`Tally.add` takes them.
ANSWERED, REFUSED, FAILED = 0, 1, 2


def outcome_of(status: int) -> int:
    """5xx failed; 4xx refused (a client that hung up, 499, is neither)."""
    if status >= 500:
        return FAILED
    if status >= 400 and status != 499:
        return REFUSED
    return ANSWERED


def _merge_counts(into: dict[int, int], other: Mapping[int, int], sign: int) -> None:
    for index, count in other.items():
        total = into.get(index, 0) + sign * count
        if total:
            into[index] = total
        else:
            del into[index]


class Tally:
    """Requests, outcomes, tokens and timings of a set of records."""

    __slots__ = (
        "client_errors",
        "completion_tokens",
        "errors",
        "first_token",
        "latency",
        "prompt_tokens",
        "requests",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.client_errors = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        #: Histogram bucket (:func:`bucket_of`) → requests.
        self.latency: dict[int, int] = {}
        self.first_token: dict[int, int] = {}

    def add(
        self,
        outcome: int,
        latency: int | None,
        first_token: int | None,
        prompt: int,
        completion: int,
    ) -> None:
        """One request; its timings as histogram buckets."""
        self.requests += 1
        if outcome == FAILED:
            self.errors += 1
        elif outcome == REFUSED:
            self.client_errors += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if latency is not None:
            self.latency[latency] = self.latency.get(latency, 0) + 1
        if first_token is not None:
            self.first_token[first_token] = self.first_token.get(first_token, 0) + 1

    def merge(self, other: Tally, sign: int = 1) -> None:
        """Add ``other`` in (or, with ``sign=-1``, take it out)."""
        self.requests += sign * other.requests
        self.client_errors += sign * other.client_errors
        self.errors += sign * other.errors
        self.prompt_tokens += sign * other.prompt_tokens
        self.completion_tokens += sign * other.completion_tokens
        _merge_counts(self.latency, other.latency, sign)
        _merge_counts(self.first_token, other.first_token, sign)

    def copy(self) -> Tally:
        copied = Tally()
        copied.merge(self)
        return copied

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


class Minute:
    """Tallies of a stretch of time: all of it, and by model, key and backend."""

    __slots__ = ("by", "total")

    def __init__(self) -> None:
        self.total = Tally()
        self.by: dict[str, dict[str, Tally]] = {dimension: {} for dimension in DIMENSIONS}

    def merge(self, other: Minute, sign: int = 1) -> None:
        self.total.merge(other.total, sign)
        for dimension, tallies in other.by.items():
            mine = self.by[dimension]
            for name, tally in tallies.items():
                found = mine.get(name)
                if found is None:
                    found = mine[name] = Tally()
                found.merge(tally, sign)
                if found.requests == 0:
                    del mine[name]

    def copy(self) -> Minute:
        copied = Minute()
        copied.merge(self)
        return copied


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

    The hour's figures are kept up to date as records come rather than
    added up when asked: the minutes before the newest one are summed in
    ``_closed`` as each closes (a late line for one of them is added to
    both), and taken out again as each leaves the hour, so an answer
    merges one minute into that sum, whatever the traffic.
    """

    def __init__(self, window: int = WINDOW_MINUTES, recent: int = RECENT_RECORDS) -> None:
        self.window = window
        self._minutes: dict[int, Minute] = {}
        #: The minutes in ``_closed_minutes`` (all before the newest), summed.
        self._closed = Minute()
        self._closed_minutes: set[int] = set()
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        #: Request id → record, for the records still in ``_recent``.
        self._by_id: dict[str, dict[str, Any]] = {}
        self.last_used: dict[str, float] = {}
        self.models: set[str] = set()
        self.keys: set[str] = set()
        self.records = 0
        self._newest_minute = 0

    def add(self, record: dict[str, Any]) -> None:
        """One access log record (anything else is ignored)."""
        path = record.get("path")
        started = seconds_of(record.get("time"))
        status = record.get("status")
        if (
            started is None
            or type(status) is not int
            or (type(path) is str and path.startswith(CONSOLE_PREFIX))
        ):
            return
        self.records += 1
        latency = seconds_of(record.get("latency_seconds"))
        ended = started + (latency or 0.0)
        key, model, backend = record.get("key"), record.get("model"), record.get("backend")
        if type(key) is str:
            self.keys.add(key)
            if ended > self.last_used.get(key, 0.0):
                self.last_used[key] = ended
        else:
            key = None
        if type(model) is str and model != "-":
            self.models.add(model)
        else:
            model = None
        if type(backend) is not str or backend == "-":
            backend = None
        self._remember(record)
        number = int(ended // 60)
        if number <= self._newest_minute - self.window:
            return  # older than the window: listed, not tallied
        if number > self._newest_minute:
            self._advance(number)
        first_token = seconds_of(record.get("first_token_seconds"))
        numbers = (
            outcome_of(status),
            bucket_of(latency) if latency is not None else None,
            bucket_of(first_token) if first_token is not None else None,
            _count(record.get("prompt_tokens")),
            _count(record.get("completion_tokens")),
        )
        minute = self._minutes.get(number)
        if minute is None:
            minute = self._minutes[number] = Minute()
        self._tally(minute, model, key, backend, numbers)
        if number < self._newest_minute:
            # A late line for a minute already summed: the sum takes it too.
            self._tally(self._closed, model, key, backend, numbers)
            self._closed_minutes.add(number)

    @staticmethod
    def _tally(
        minute: Minute,
        model: str | None,
        key: str | None,
        backend: str | None,
        numbers: tuple[int, int | None, int | None, int, int],
    ) -> None:
        minute.total.add(*numbers)
        for dimension, value in (("model", model), ("key", key), ("backend", backend)):
            if value is None:
                continue
            tallies = minute.by[dimension]
            tally = tallies.get(value)
            if tally is None:
                if len(tallies) >= DISTINCT_PER_MINUTE:
                    value = OTHER
                tally = tallies.get(value)
                if tally is None:
                    tally = tallies[value] = Tally()
            tally.add(*numbers)

    def _advance(self, newest: int) -> None:
        """A newer minute begins: the one before is summed, the oldest leave."""
        previous = self._newest_minute
        self._newest_minute = newest
        if previous in self._minutes and previous not in self._closed_minutes:
            self._closed.merge(self._minutes[previous])
            self._closed_minutes.add(previous)
        self._forget_before(newest - self.window + 1)

    def _forget_before(self, first: int) -> None:
        for number in [n for n in self._minutes if n < first]:
            minute = self._minutes.pop(number)
            if number in self._closed_minutes:
                self._closed.merge(minute, sign=-1)
                self._closed_minutes.discard(number)

    def _remember(self, record: dict[str, Any]) -> None:
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            if self._by_id.get(oldest.get("request_id", "")) is oldest:
                del self._by_id[oldest["request_id"]]
        self._recent.append(record)
        request_id = record.get("request_id")
        if type(request_id) is str:
            self._by_id[request_id] = record

    # -- what the console asks -----------------------------------------------------

    def series(self, now: float) -> list[dict[str, Any]]:
        """One entry a minute, oldest first, for the last hour up to ``now``."""
        current = int(now // 60)
        empty = Tally().summary()
        series = []
        for number in range(current - self.window + 1, current + 1):
            minute = self._minutes.get(number)
            summary = minute.total.summary() if minute is not None else empty
            series.append({"minute": number * 60, **summary})
        return series

    def hour(self, now: float) -> dict[str, Any]:
        """The last hour, in all and by model, key and backend, busiest first."""
        current = int(now // 60)
        first = current - self.window + 1
        if any(number < first for number in self._minutes):
            self._forget_before(first)  # time went by without a line
        hour = self._closed.copy()
        newest = self._minutes.get(self._newest_minute)
        if newest is not None and self._newest_minute <= current:
            hour.merge(newest)
        for number in [n for n in self._closed_minutes if n > current]:
            # Lines from after ``now`` (a writer's clock ahead): not yet.
            hour.merge(self._minutes[number], sign=-1)
        return {
            "total": hour.total.summary(),
            **{f"by_{dimension}": ranked(tallies) for dimension, tallies in hour.by.items()},
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
