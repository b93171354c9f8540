"""
When certificates are renewed, and what a failure does: the schedule's
arithmetic, and the renewal service driven by a ``task.Clock``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from oproxy.certs.files import Held
from oproxy.certs.renewal import CertificateService, Stopped
from oproxy.certs.schedule import (
    LONGEST_SLEEP,
    RETRY_DELAYS,
    renewal_time,
    retry_delay,
    sleep_until,
)

DAY = 86400.0


def test_renewal_is_due_with_a_third_of_the_lifetime_left() -> None:
    assert renewal_time(0, 90 * DAY) == 60 * DAY
    assert renewal_time(1000, 1300) == 1200
    # A year's local certificate: renewed after eight months.
    assert renewal_time(0, 365 * DAY) == pytest.approx(243.33 * DAY, rel=1e-3)


def test_retries_wait_longer_and_longer_up_to_a_bound() -> None:
    delays = [retry_delay(n) for n in range(1, 20)]
    assert delays[:4] == [60, 120, 300, 600]
    assert delays == sorted(delays)
    assert max(delays) == RETRY_DELAYS[-1] == 6 * 3600
    assert retry_delay(0) == 60  # never zero: no loop even if asked


def test_the_service_looks_again_at_least_hourly() -> None:
    assert sleep_until(60 * DAY, 0) == LONGEST_SLEEP
    assert sleep_until(100, 40) == 60
    assert sleep_until(10, 40) == 0


def held(not_before: float, not_after: float, serial: int = 1) -> Held:
    return Held(
        path=f"/certs/gw.example.com-{serial}.pem",
        names=("gw.example.com",),
        issuer="Test CA",
        not_before=not_before,
        not_after=not_after,
        serial=serial,
        fingerprint=f"{serial:064x}",
        key=None,  # type: ignore[arg-type]
        chain=(),
    )


class FakeJob:
    """A source of certificates: what it holds, and what obtaining does."""

    kind = "acme"
    names = ("gw.example.com",)

    def __init__(self, clock: task.Clock, lifetime: float = 90 * DAY) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.held: Held | None = None
        self.attempts: list[float] = []
        self.failing: Exception | None = None
        self.serials = 0

    def current(self) -> Held | None:
        return self.held

    def obtain(self, stopping: threading.Event) -> Held:
        self.attempts.append(self.clock.seconds())
        if self.failing is not None:
            raise self.failing
        self.serials += 1
        now = self.clock.seconds()
        self.held = held(now, now + self.lifetime, self.serials)
        return self.held

    def explain(self, error: Exception) -> str:
        return f"explained: {error}"


def at_once(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


def started(clock: task.Clock, job: FakeJob, status: Path | None = None) -> CertificateService:
    service = CertificateService(
        clock, [job], at_once, str(status) if status else None, extra={"acme": {"x": "y"}}
    )
    service.startService()
    return service


def test_a_certificate_is_obtained_at_start_then_renewed_at_two_thirds(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    job = FakeJob(clock)
    status = tmp_path / "status.json"
    service = started(clock, job, status)
    assert job.attempts == [1_000_000]
    assert service.statuses["acme"].state == "ok"
    written = json.loads(status.read_text())
    assert written["acme"]["state"] == "ok"
    assert written["acme"]["x"] == "y"
    assert written["acme"]["names"] == ["gw.example.com"]
    # Nothing happens until two thirds of the 90 days are gone...
    clock.advance(60 * DAY - 1)
    assert len(job.attempts) == 1
    clock.advance(1)
    # ...then it is renewed once, and the next renewal is 60 days later.
    assert job.attempts == [1_000_000, 1_000_000 + 60 * DAY]
    clock.advance(30 * DAY)
    assert len(job.attempts) == 2


def test_a_failure_keeps_the_old_certificate_and_retries_with_backoff() -> None:
    clock = task.Clock()
    job = FakeJob(clock)
    service = started(clock, job)
    old = job.held
    clock.advance(60 * DAY)
    assert len(job.attempts) == 2
    job.failing = ConnectionError("no route")
    clock.advance(60 * DAY)
    assert len(job.attempts) == 3
    status = service.statuses["acme"]
    assert status.state == "failing"
    assert status.error == "explained: no route"
    assert status.failures == 1
    assert job.held is not old and job.held is not None  # the last good one stays
    kept = job.held
    # Retried after 60 s, 120 s, 300 s, 600 s...: never sooner.
    times = []
    for _ in range(12):
        before = len(job.attempts)
        waited = 0
        while len(job.attempts) == before:
            clock.advance(1)
            waited += 1
        times.append(waited)
    assert times[:5] == [60, 120, 300, 600, 1200]
    assert max(times) == 21600
    assert job.held is kept
    assert service.statuses["acme"].failures == 13
    # Fixed: the next retry succeeds, and the count starts again.
    job.failing = None
    clock.advance(21600)
    assert service.statuses["acme"].state == "ok"
    assert service.statuses["acme"].failures == 0
    assert service.statuses["acme"].error is None


def test_a_certificate_due_the_moment_it_arrives_is_no_reason_to_loop() -> None:
    clock = task.Clock()
    # The CA issues certificates that are already two thirds gone (a clock
    # far behind, or backdating): each counts as a failure, retried later.
    job = FakeJob(clock, lifetime=30)

    def backdated(stopping: threading.Event) -> Held:
        job.attempts.append(clock.seconds())
        now = clock.seconds()
        job.held = held(now - 1000, now + 10)
        return job.held

    job.obtain = backdated  # type: ignore[method-assign]
    service = started(clock, job)
    assert len(job.attempts) == 1
    assert service.statuses["acme"].state == "failing"
    assert "already due for renewal" in (service.statuses["acme"].error or "")
    clock.advance(59)
    assert len(job.attempts) == 1
    clock.advance(1)
    assert len(job.attempts) == 2


def test_a_missing_certificate_is_obtained_and_a_valid_one_is_kept() -> None:
    clock = task.Clock()
    clock.advance(100)
    job = FakeJob(clock)
    job.held = held(0, 90 * DAY)
    service = started(clock, job)
    assert job.attempts == []
    assert service.statuses["acme"].state == "ok"
    assert service.statuses["acme"].renew_at == "1970-03-02T00:00:00Z"


def test_stopping_cancels_the_sleep_and_waits_for_work_in_a_thread() -> None:
    clock = task.Clock()
    job = FakeJob(clock)
    in_thread: list[defer.Deferred[Any]] = []
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def later(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        calls.append((f, args))
        d: defer.Deferred[Any] = defer.Deferred()
        in_thread.append(d)
        return d

    service = CertificateService(clock, [job], later, None)
    service.startService()
    assert calls[0][0] == job.current
    in_thread[0].callback(None)
    assert calls[1][0] == job.obtain
    stopping_event = calls[1][1][0]
    stopped = service.stopService()
    assert stopping_event.is_set()
    assert not stopped.called  # the job still runs in its thread
    in_thread[1].errback(Stopped())
    assert stopped.called
    assert not clock.getDelayedCalls()


def test_stopping_while_asleep_is_immediate() -> None:
    clock = task.Clock()
    job = FakeJob(clock)
    service = started(clock, job)
    assert clock.getDelayedCalls()
    stopped = service.stopService()
    assert stopped.called
    assert not clock.getDelayedCalls()
    clock.advance(100 * DAY)
    assert len(job.attempts) == 1
