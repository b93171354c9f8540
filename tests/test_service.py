"""
The service tree's order: bind, open, serve; then stop accepting, drain,
settle, and only then close the cache, the store and the pool.

The parts are fakes that write down what happens to them, on a clock the
test turns: each step can be held back to see that the next one waits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from oproxy.after_send import AfterSend
from oproxy.config import StateConfig
from oproxy.metrics import Metrics
from oproxy.security.guard import Guard, Ticket
from oproxy.security.limits import Caller, plan
from oproxy.security.policy import KeyPolicy, Limits
from oproxy.service import CannotServe, ProcessService, ProxyService, Refusal, Resources


class Journal(list[str]):
    """What happened, in order."""


class FakeSite:
    """A site whose in-flight requests end when the test says so."""

    def __init__(self, journal: Journal, in_flight: int = 0) -> None:
        self.journal = journal
        self.in_flight = in_flight
        self._idle: list[defer.Deferred[None]] = []

    def idle(self) -> defer.Deferred[None]:
        if not self.in_flight:
            return defer.succeed(None)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._idle.append(waiting)
        return waiting

    def end_requests(self) -> None:
        self.in_flight = 0
        waiting, self._idle = self._idle, []
        for each in waiting:
            each.callback(None)

    def close_connections(self) -> defer.Deferred[None]:
        self.journal.append("connections closed")
        return defer.succeed(None)

    def abort_connections(self) -> None:
        self.journal.append("connections aborted")
        self.end_requests()


class FakePort:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def stopListening(self) -> None:
        self.journal.append("stopped listening")

    def getHost(self) -> Any:
        return None


class HeldStore:
    """
    A state store whose settlements are answered when the test says so, as
    a Redis store's are answered later.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.pending: list[defer.Deferred[None]] = []

    opened = False

    def has_active_keys(self) -> defer.Deferred[bool]:
        if not self.opened:
            self.opened = True
            self.journal.append("store opened")
        return defer.succeed(False)

    def settle(self, rates: Any, quotas: Any, released: Any, now: float) -> defer.Deferred[None]:
        self.journal.append("settling")
        held: defer.Deferred[None] = defer.Deferred()
        self.pending.append(held)
        return held

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for held in pending:
            self.journal.append("settled")
            held.callback(None)

    def close(self) -> defer.Deferred[None]:
        self.journal.append("store closed")
        return defer.succeed(None)


class FakeCache:
    def __init__(self, journal: Journal, name: str = "cache") -> None:
        self.journal = journal
        self.name = name

    async def close(self) -> None:
        self.journal.append(f"{self.name} closed")


class FakePool:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def closeCachedConnections(self) -> defer.Deferred[None]:
        self.journal.append("pool closed")
        return defer.succeed(None)


class FakeAccessLog:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def open(self) -> None:
        self.journal.append("access log opened")

    def close(self) -> None:
        self.journal.append("access log closed")


class Noted(service.Service):
    """A child service that notes its start and stop."""

    def __init__(self, journal: Journal, name: str) -> None:
        self.journal = journal
        self.name = name

    def startService(self) -> None:
        super().startService()
        self.journal.append(f"{self.name} started")

    def stopService(self) -> None:
        super().stopService()
        self.journal.append(f"{self.name} stopped")


def limited_ticket(guard: Guard) -> Ticket:
    """What admitting one request of a key with a quota and a parallel slot charged."""
    caller = Caller(
        subject="key:abc",
        name="graceful",
        policy=KeyPolicy(limits=Limits(daily_tokens=100_000, max_parallel=1)),
    )
    spent = plan(
        caller, "slow", prompt_estimate=3, completion_estimate=256, now=0.0, lease_id="req_1"
    )
    return Ticket(caller, spent)


def build(journal: Journal, reactor: MemoryReactorClock, site: FakeSite) -> ProxyService:
    store = HeldStore(journal)
    guard = Guard(store, reactor, Metrics(None), StateConfig())  # type: ignore[arg-type]
    after_send = AfterSend(reactor)
    caches = {"cache": FakeCache(journal)}
    top = ProxyService(
        reactor,
        Resources(
            guard=guard,
            cache=lambda: caches["cache"],  # type: ignore[arg-type,return-value]
            pool=FakePool(journal),
            after_send=after_send,
            access_log=FakeAccessLog(journal),  # type: ignore[arg-type]
            draining=lambda: journal.append("draining"),
        ),
        make_site=lambda: site,  # type: ignore[arg-type,return-value]
        bind=lambda site: [FakePort(journal)],  # type: ignore[list-item]
        drain_timeout=lambda: 30.0,
        reporting=Noted(journal, "reporting"),
    )
    top.addService(Noted(journal, "probes"))
    return top


def run_until(reactor: MemoryReactorClock, done: defer.Deferred[Any]) -> None:
    for _ in range(100):
        if done.called:
            return
        reactor.advance(0.5)
    raise AssertionError("never done")


def test_a_stop_settles_the_last_requests_before_closing_the_store() -> None:
    journal = Journal()
    reactor = MemoryReactorClock()
    site = FakeSite(journal, in_flight=1)
    top = build(journal, reactor, site)
    top.privilegedStartService()
    top.startService()
    assert journal == ["reporting started", "access log opened", "store opened", "probes started"]
    journal.clear()

    stopping = top.stopService()
    assert journal == ["draining", "stopped listening"]
    reactor.advance(10)  # the stream goes on; nothing is closed under it
    assert journal == ["draining", "stopped listening"]

    # The stream ends: its handler's ending settles its ticket with the
    # store (which answers later) and leaves its access line for after the
    # answer is sent.
    guard = top.resources.guard
    guard.settle(limited_ticket(guard), 412)
    top.resources.after_send(journal.append, "last access line written")
    site.end_requests()
    reactor.advance(0)
    reactor.advance(0)
    assert journal[2:] == [
        "settling",
        "connections closed",
        "probes stopped",
        "last access line written",
    ]
    reactor.advance(10)
    assert not stopping.called, "the store must not close before the settlement is written"

    journal.clear()
    top.resources.guard.store.answer()  # type: ignore[attr-defined]
    run_until(reactor, stopping)
    assert journal == [
        "settled",
        "cache closed",
        "store closed",
        "pool closed",
        "access log closed",
        "reporting stopped",
    ]


def test_requests_still_running_at_the_deadline_are_cut_off_and_settled() -> None:
    journal = Journal()
    reactor = MemoryReactorClock()
    site = FakeSite(journal, in_flight=1)
    top = build(journal, reactor, site)
    top.privilegedStartService()
    top.startService()
    journal.clear()
    stopping = top.stopService()
    reactor.advance(29)
    assert "connections aborted" not in journal
    reactor.advance(1)
    assert "connections aborted" in journal
    run_until(reactor, stopping)
    assert journal[-5:] == [
        "cache closed",
        "store closed",
        "pool closed",
        "access log closed",
        "reporting stopped",
    ]


def test_a_cache_a_reload_replaced_is_closed_and_waited_for() -> None:
    journal = Journal()
    reactor = MemoryReactorClock()
    top = build(journal, reactor, FakeSite(journal))
    top.privilegedStartService()
    top.startService()

    class SlowCache(FakeCache):
        closing: defer.Deferred[None] = defer.Deferred()

        async def close(self) -> None:
            await self.closing
            self.journal.append("old cache closed")

    old = SlowCache(journal)
    top.retire_cache(old)  # type: ignore[arg-type]
    stopping = top.stopService()
    run_until(reactor, top.resources.guard.stop())
    reactor.advance(1)
    assert "store closed" not in journal and not stopping.called
    old.closing.callback(None)
    run_until(reactor, stopping)
    assert journal.index("old cache closed") < journal.index("store closed")


def test_a_port_in_use_stops_the_foreground_daemon_with_one_line(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    journal = Journal()
    reactor = MemoryReactorClock()
    top = build(journal, reactor, FakeSite(journal))
    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text("12345")
    top.refusal = Refusal(foreground=True, pidfile=str(pidfile))

    def taken(site: Any) -> Any:
        raise CannotListenError("127.0.0.1", 8000, OSError(98, "Address already in use"))

    top._bind = taken
    with pytest.raises(SystemExit) as exited:
        top.privilegedStartService()
    assert exited.value.code == 1
    said = capfd.readouterr().err
    assert said == "oproxy: cannot listen on 8000: [Errno 98] Address already in use\n"
    assert journal == []
    assert not pidfile.exists(), "twistd's pid file goes with the process"


def test_a_detached_daemon_hands_the_line_to_twistd(capfd: pytest.CaptureFixture[str]) -> None:
    """
    ``twistd`` (without ``-n``) catches an exception from the start, sends
    its text to the parent it forked from, which prints it and exits 1; a
    ``SystemExit`` would leave that parent waiting for ever.
    """

    class Refusing(ProcessService):
        def bind(self) -> None:
            raise CannotServe("oproxy: cannot listen on 8000: [Errno 98] Address already in use")

    with pytest.raises(CannotServe) as refused:
        Refusing(refusal=Refusal(foreground=False)).privilegedStartService()
    assert not isinstance(refused.value, SystemExit)
    assert str(refused.value).startswith("oproxy: cannot listen on 8000")
    assert capfd.readouterr().err == ""
