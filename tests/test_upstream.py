"""
The upstream HTTP plumbing, driven by a fake clock and fake transports.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from oproxy.config import BackendConfig, Timeouts
from oproxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from oproxy.upstream import HIGH_WATER_LINES, BodyReader, DeadlineExceeded, Upstream, within


def reader(clock: task.Clock, idle: float = 10.0, max_bytes: int = 1 << 20) -> BodyReader:
    body = BodyReader(clock, idle, "test", max_bytes)
    body.makeConnection(StringTransport())
    return body


def run(clock: task.Clock, coroutine: Any) -> defer.Deferred[Any]:
    return defer.Deferred.fromCoroutine(coroutine)


def test_lines_split_across_chunks() -> None:
    clock = task.Clock()
    body = reader(clock)
    body.dataReceived(b'{"a":')
    body.dataReceived(b'1}\n{"b":2}\n{"c"')
    got = run(clock, body.next_lines())
    assert got.result == [b'{"a":1}', b'{"b":2}']
    body.dataReceived(b":3}")
    body.connectionLost(Failure(ResponseDone()))
    assert run(clock, body.next_lines()).result == [b'{"c":3}']
    assert run(clock, body.next_lines()).result == []


def test_potential_data_loss_is_a_normal_end() -> None:
    body = reader(task.Clock())
    body.dataReceived(b"x\n")
    body.connectionLost(Failure(PotentialDataLoss()))
    assert run(task.Clock(), body.read_all()).result == b"x"


def test_connection_lost_mid_body_is_an_upstream_error() -> None:
    body = reader(task.Clock())
    waiting = run(task.Clock(), body.next_lines())
    body.connectionLost(Failure(error.ConnectionLost()))
    assert isinstance(waiting.result.value, UpstreamError)
    waiting.addErrback(lambda _: None)


def test_idle_timeout_aborts_and_fails() -> None:
    clock = task.Clock()
    body = reader(clock, idle=5)
    waiting = run(clock, body.next_lines())
    clock.advance(4)
    body.dataReceived(b"a\n")
    assert waiting.result == [b"a"]
    waiting = run(clock, body.next_lines())
    clock.advance(4.9)
    assert not waiting.called
    clock.advance(0.2)
    failure = waiting.result
    assert isinstance(failure.value, UpstreamTimeout)
    waiting.addErrback(lambda _: None)
    assert body.transport.producerState == "stopped"  # type: ignore[union-attr]


def test_oversized_body_fails_and_aborts() -> None:
    clock = task.Clock()
    body = reader(clock, max_bytes=10)
    waiting = run(clock, body.next_lines())
    body.dataReceived(b"0123456789abc\n")
    assert isinstance(waiting.result.value, UpstreamError)
    waiting.addErrback(lambda _: None)
    assert body.transport.producerState == "stopped"  # type: ignore[union-attr]


def test_backpressure_pauses_and_resumes_upstream() -> None:
    clock = task.Clock()
    body = reader(clock)
    body.dataReceived(b"x\n" * HIGH_WATER_LINES)
    assert body.transport.producerState == "paused"  # type: ignore[union-attr]
    assert len(run(clock, body.next_lines()).result) == HIGH_WATER_LINES
    assert body.transport.producerState == "producing"  # type: ignore[union-attr]


def test_cancelling_the_reader_closes_upstream() -> None:
    clock = task.Clock()
    body = reader(clock)
    waiting = run(clock, body.next_lines())
    waiting.cancel()
    assert body.transport.producerState == "stopped"  # type: ignore[union-attr]
    waiting.addErrback(lambda _: None)


def test_raw_mode_keeps_newlines() -> None:
    body = BodyReader(task.Clock(), 5, "img", 100, split_lines=False)
    body.makeConnection(StringTransport())
    body.dataReceived(b"\x89PNG\r\n")
    body.dataReceived(b"\n\x00")
    body.connectionLost(Failure(ResponseDone()))
    assert run(task.Clock(), body.read_all()).result == b"\x89PNG\r\n\n\x00"


def test_within_expires() -> None:
    clock = task.Clock()
    slow: defer.Deferred[int] = defer.Deferred()
    result = run(clock, within(slow, 3, clock))
    clock.advance(3)
    assert isinstance(result.result.value, DeadlineExceeded)
    result.addErrback(lambda _: None)


def test_within_passes_result_and_cancels_timer() -> None:
    clock = task.Clock()
    quick: defer.Deferred[int] = defer.Deferred()
    result = run(clock, within(quick, 3, clock))
    quick.callback(7)
    assert result.result == 7
    assert clock.getDelayedCalls() == []


class FailingClient:
    """A treq client whose requests fail the way Twisted reports failures."""

    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(self.failure)


@pytest.mark.parametrize(
    ("failure", "expected", "words"),
    [
        (error.ConnectionRefusedError(), UpstreamUnavailable, "connection refused"),
        (error.DNSLookupError(), UpstreamUnavailable, "host name"),
        (error.TimeoutError(), UpstreamTimeout, "connection within 2"),
    ],
)
def test_connect_failures_map_to_errors(
    failure: Exception, expected: type[Exception], words: str
) -> None:
    clock = task.Clock()
    backend = BackendConfig(
        name="b", type="ollama", url="http://127.0.0.1:1", timeouts=Timeouts(connect=2)
    )
    upstream = Upstream(backend, FailingClient(failure), clock)  # type: ignore[arg-type]
    result = run(clock, upstream.request_json("GET", "/api/tags"))
    assert isinstance(result.result.value, expected)
    assert words in str(result.result.value)
    result.addErrback(lambda _: None)
