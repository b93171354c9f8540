"""
What both fakes are built on (``oproxy.testing.base``): the pacing of a
generation on an injected clock, and the counters a soak compares with
what a proxy charged.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import Request

from oproxy.testing.base.kinds import kind_of
from oproxy.testing.base.pacing import Pacer
from oproxy.testing.base.stats import ServerStats


class Client:
    """The parts of a request a :class:`Pacer` uses."""

    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred()
        self.closed = False

    def notifyFinish(self) -> Deferred[None]:
        return self.finished

    def loseConnection(self) -> None:
        self.closed = True
        self.finished.errback(Failure(ConnectionLost()))


class Run:
    """A pacer over four steps, with what it did."""

    def __init__(self, clock: Clock, delay: float, **knobs: Any) -> None:
        self.done: list[int] = []
        self.aborts = 0
        self.client = Client()
        steps = [lambda i=i: self.done.append(i) for i in range(4)]
        self.pacer = Pacer(clock, delay, steps, lambda: b"end", self._aborted, **knobs)
        self.result: list[bytes | None] = []

    def _aborted(self) -> None:
        self.aborts += 1

    def start(self, **knobs: Any) -> None:
        started = self.pacer.start(cast(Request, self.client), **knobs)
        started.addCallback(self.result.append)
        started.addErrback(lambda f: f.trap(CancelledError))


def test_steps_follow_the_clock_without_drift() -> None:
    clock = Clock()
    run = Run(clock, 1.0)
    run.start()
    assert run.done == [] and run.pacer.pending
    clock.advance(2.5)
    assert run.done == [0, 1]
    clock.advance(1.5)
    assert run.done == [0, 1, 2, 3]
    assert run.result == [b"end"]
    assert not run.pacer.pending and clock.getDelayedCalls() == []


def test_no_delay_runs_everything_at_once() -> None:
    run = Run(Clock(), 0.0)
    run.start()
    assert run.done == [0, 1, 2, 3] and run.result == [b"end"]


def test_a_load_comes_before_the_first_step() -> None:
    clock = Clock()
    run = Run(clock, 1.0)
    run.start(load_delay=5.0)
    clock.advance(5.5)
    assert run.done == []
    clock.advance(0.5)
    assert run.done == [0]


def test_a_stall_waits_for_the_client_to_give_up() -> None:
    clock = Clock()
    run = Run(clock, 1.0, stall_after=2)
    run.start()
    clock.advance(100)
    assert run.done == [0, 1] and run.result == [] and not run.pacer.pending
    run.client.finished.errback(Failure(ConnectionLost()))
    assert run.aborts == 1


def test_stalling_from_the_start_schedules_nothing_even_with_a_load() -> None:
    clock = Clock()
    run = Run(clock, 1.0, stall_after=0)
    run.start(load_delay=3.0)
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert run.done == []


def test_cancelling_the_answer_aborts_once() -> None:
    clock = Clock()
    run = Run(clock, 1.0)
    run.start()
    clock.advance(1)
    run.pacer.deferred.cancel()  # what Klein does when the client goes
    run.client.finished.errback(Failure(ConnectionLost()))
    clock.advance(10)
    assert run.done == [0] and run.aborts == 1
    assert clock.getDelayedCalls() == []


def test_abandon_closes_the_connection_and_counts_an_abort() -> None:
    clock = Clock()
    run = Run(clock, 1.0)
    run.start()
    clock.advance(2)
    run.pacer.abandon()
    assert run.client.closed and run.aborts == 1
    clock.advance(10)
    assert run.done == [0, 1] and run.result == []


def test_abandon_after_the_end_changes_nothing() -> None:
    run = Run(Clock(), 0.0)
    run.start()
    run.pacer.abandon()
    assert run.aborts == 0 and run.result == [b"end"]


def test_tokens_by_model_and_in_total() -> None:
    stats: ServerStats[str] = ServerStats()
    stats.count_tokens("a", 3, 5)
    stats.count_tokens("b", 7)
    stats.count_tokens("a", 1, 1)
    counters = stats.counters()
    assert (counters["prompt_tokens"], counters["completion_tokens"]) == (11, 6)
    assert counters["tokens_by_model"] == {
        "a": {"prompt_tokens": 4, "completion_tokens": 6},
        "b": {"prompt_tokens": 7, "completion_tokens": 0},
    }
    stats.started = 2
    stats.reset(in_flight=1)
    assert stats.counters()["in_flight"] == 1 and stats.tokens == {}


def test_json_kinds() -> None:
    values = [None, True, 0, 1.5, "", [], {}]
    kinds = ["null", "boolean", "integer", "number", "string", "array", "object"]
    assert [kind_of(value) for value in values] == kinds
