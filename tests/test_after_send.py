"""
Bookkeeping waits until the answer is sent, and is never lost.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import globalLogPublisher

from oproxy.after_send import AfterSend


def test_work_waits_for_the_clock_and_runs_in_order() -> None:
    clock = task.Clock()
    after = AfterSend(clock)
    done: list[int] = []
    after(done.append, 1)
    after(done.append, 2)
    assert done == []
    assert len(clock.getDelayedCalls()) == 1, "one pair of timed calls per turn"
    clock.advance(0)  # a Clock runs both turns at once
    assert done == [1, 2]
    after(done.append, 3)
    clock.advance(0)
    assert done == [1, 2, 3]


def test_run_does_what_waits_at_once() -> None:
    after = AfterSend(task.Clock())
    done: list[str] = []
    after(done.append, "at shutdown")
    after.run()
    assert done == ["at shutdown"]


def test_a_failure_is_logged_and_the_rest_still_runs() -> None:
    clock = task.Clock()
    after = AfterSend(clock)
    events: list[dict[str, Any]] = []
    done: list[str] = []
    globalLogPublisher.addObserver(events.append)
    try:
        after(lambda: 1 / 0)
        after(done.append, "next")
        clock.advance(0)
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert done == ["next"]
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(ZeroDivisionError)


class Answering(protocol.Protocol):
    """Answers the first bytes it gets, then looks at the client's socket."""

    def __init__(self, client: socket.socket, schedule: Any, seen: defer.Deferred[bytes]) -> None:
        self.client, self.schedule, self.seen = client, schedule, seen

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"the answer")  # type: ignore[union-attr]
        self.schedule(self.look)

    def look(self) -> None:
        try:
            self.seen.callback(self.client.recv(100, socket.MSG_DONTWAIT))
        except BlockingIOError:
            self.seen.callback(b"")


async def answer_and_look(schedule_for: Any) -> bytes:
    """What the client had received when the scheduled look ran."""
    seen: defer.Deferred[bytes] = defer.Deferred()
    client = socket.socket()
    factory = protocol.Factory()
    factory.protocol = lambda: Answering(client, schedule_for(reactor), seen)  # type: ignore[assignment,misc]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        client.sendall(b"question")
        return await seen
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_answer_is_on_the_wire_before_the_work_runs() -> None:
    assert await answer_and_look(AfterSend) == b"the answer"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["now", "next turn"])
async def test_sooner_would_hold_the_answer_back(how: str) -> None:
    """Why the wait is two turns: Twisted sends on its next pass over the sockets."""

    def schedule_for(reactor: Any) -> Any:
        if how == "now":
            return lambda work: work()
        return lambda work: reactor.callLater(0, work)

    assert await answer_and_look(schedule_for) == b""
