"""
The lean HTTP/1.1 client, against a server that sends exactly the bytes a
test gives it.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from oproxy.http11 import BadResponse, IdleConnections, LeanAgent
from oproxy.upstream import BytesProducer, ReusedEndpoints


class Scripted(protocol.Protocol):
    """Answers each whole request with the next scripted answer."""

    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.factory.requests.append(head + b"\r\n\r\n" + rest[:length])  # type: ignore[attr-defined]
            self.buffer = rest[length:]
            answer, close = self.factory.answers.pop(0)  # type: ignore[attr-defined]
            assert self.transport is not None
            if answer:
                self.transport.write(answer)
            if close:
                self.transport.loseConnection()


class Collector(protocol.Protocol):
    """A body protocol that keeps what it gets and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        # A Failure passed to callback() would fail the Deferred: wrap it.
        self.ended: defer.Deferred[list[Failure]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.ended.callback([reason])


class Refused:
    """The fallback agent: records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def request(self, method: bytes, uri: bytes, *args: Any) -> defer.Deferred[Any]:
        self.asked.append(uri)
        return defer.fail(RuntimeError("fallback"))


@pytest.fixture
def server() -> Iterator[Any]:
    factory = protocol.Factory()
    factory.protocol = Scripted
    factory.answers = []  # type: ignore[attr-defined]
    factory.requests = []  # type: ignore[attr-defined]
    factory.connections = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    factory.url = f"http://127.0.0.1:{port.getHost().port}".encode()  # type: ignore[attr-defined]
    idle = IdleConnections()
    factory.fallback = Refused()  # type: ignore[attr-defined]
    factory.agent = LeanAgent(ReusedEndpoints(reactor, 5), factory.fallback, idle)  # type: ignore[attr-defined]
    yield factory
    idle.close()
    pytest_twisted.blockon(port.stopListening())


async def fetch(server: Any, path: bytes = b"/api/chat", body: bytes | None = b"{}") -> Any:
    """One POST; the response, its body and how the body ended."""
    response = await server.agent.request(
        b"POST",
        server.url + path,
        Headers({b"content-type": [b"application/json"]}),
        BytesProducer(body) if body is not None else None,
    )
    collector = Collector()
    response.deliverBody(collector)
    (reason,) = await collector.ended
    return response, collector.data, reason


@pytest_twisted.ensureDeferred
async def test_content_length_answers_reuse_one_connection(server: Any) -> None:
    answer = (
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{"a":1}'
    )
    server.answers += [(answer, False), (answer, False)]
    for _ in range(2):
        response, data, reason = await fetch(server)
        assert response.code == 200 and response.length == 7 and data == b'{"a":1}'
        assert reason.check(ResponseDone)
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        assert not response.headers.hasHeader(b"content-length")
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /api/chat HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 2\r\n" in first and first.endswith(b"\r\n\r\n{}")
    assert b"\r\nhost: 127.0.0.1:" in first.lower()


@pytest_twisted.ensureDeferred
async def test_chunked_answer_with_extensions_and_trailer(server: Any) -> None:
    server.answers.append(
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: y\r\n\r\n",
            False,
        )
    )
    server.answers.append((b"HTTP/1.1 204 No Content\r\n\r\n", False))
    response, data, reason = await fetch(server)
    assert (
        response.length is UNKNOWN_LENGTH and data == b"hello world" and reason.check(ResponseDone)
    )
    response, data, reason = await fetch(server)
    assert response.code == 204 and data == b"" and reason.check(ResponseDone)
    assert server.connections == 1


@pytest_twisted.ensureDeferred
async def test_an_answer_without_length_ends_with_the_connection(server: Any) -> None:
    server.answers.append((b"HTTP/1.1 200 OK\r\n\r\nuntil the end", True))
    server.answers.append((b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False))
    _, data, reason = await fetch(server)
    assert data == b"until the end" and reason.check(http.PotentialDataLoss)
    _, data, _ = await fetch(server)
    assert data == b"ok" and server.connections == 2


@pytest_twisted.ensureDeferred
async def test_connection_close_is_not_reused(server: Any) -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    server.answers += [(closing, False), (closing, False)]
    await fetch(server)
    await fetch(server)
    assert server.connections == 2


@pytest_twisted.ensureDeferred
async def test_an_interim_answer_is_skipped(server: Any) -> None:
    server.answers.append(
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz",
            False,
        )
    )
    response, data, _ = await fetch(server)
    assert response.code == 200 and data == b"z"


@pytest.mark.parametrize(
    "answer",
    [
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000,
    ],
)
@pytest_twisted.ensureDeferred
async def test_unreadable_answers_fail_before_the_response(server: Any, answer: bytes) -> None:
    server.answers.append((answer, False))
    with pytest.raises(ResponseNeverReceived) as raised:
        await fetch(server)
    assert raised.value.reasons[0].check(BadResponse)


@pytest_twisted.ensureDeferred
async def test_a_server_that_hangs_up_before_answering(server: Any) -> None:
    server.answers.append((b"", True))
    with pytest.raises(ResponseNeverReceived):
        await fetch(server)


@pytest.mark.parametrize(
    ("answer", "close"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\ntoo long", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_broken_body_fails_the_body(server: Any, answer: bytes, close: bool) -> None:
    server.answers.append((answer, close))
    response, _, reason = await fetch(server)
    assert response.code == 200
    assert reason.check(ResponseFailed)


@pytest_twisted.ensureDeferred
async def test_cancelling_before_the_answer_closes_the_connection(server: Any) -> None:
    server.answers.append((b"", False))  # the server never answers
    waiting = server.agent.request(b"POST", server.url + b"/slow", None, BytesProducer(b"{}"))
    await defer.Deferred.fromCoroutine(_until(lambda: server.requests))
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    server.answers.append((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nk", False))
    _, data, _ = await fetch(server)
    assert data == b"k" and server.connections == 2


@pytest_twisted.ensureDeferred
async def test_other_schemes_and_unheld_bodies_go_to_the_fallback(server: Any) -> None:
    with pytest.raises(RuntimeError):
        await server.agent.request(b"GET", b"https://example.com/v1/models")
    streamed = FileBodyProducer(BytesIO(b"{}"))  # a body not held in memory
    with pytest.raises(RuntimeError):
        await server.agent.request(b"POST", server.url + b"/api/chat", None, streamed)
    assert server.fallback.asked == [b"https://example.com/v1/models", server.url + b"/api/chat"]
    assert server.connections == 0


async def _until(condition: Any) -> None:
    while not condition():
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_body_asked_for_late_still_arrives_whole(server: Any) -> None:
    server.answers.append((b"HTTP/1.1 200 OK\r\n\r\nsaid and gone", True))
    response = await server.agent.request(b"GET", server.url + b"/late")
    await defer.Deferred.fromCoroutine(_until(lambda: server.requests))
    await task.deferLater(reactor, 0.05, lambda: None)  # the server has hung up
    collector = Collector()
    response.deliverBody(collector)
    (reason,) = await collector.ended
    assert collector.data == b"said and gone" and reason.check(http.PotentialDataLoss)


@pytest_twisted.ensureDeferred
async def test_stopping_a_body_fails_it_and_drops_the_connection(server: Any) -> None:
    server.answers.append((b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart", False))
    response = await server.agent.request(b"GET", server.url + b"/stop")
    collector = Collector()
    response.deliverBody(collector)
    await defer.Deferred.fromCoroutine(_until(lambda: collector.data))
    assert collector.transport is not None
    collector.transport.stopProducing()
    (reason,) = await collector.ended
    assert reason.check(ResponseFailed)
    server.answers.append((b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nn", False))
    _, data, _ = await fetch(server)
    assert data == b"n" and server.connections == 2


class RecordingEndpoints:
    """Endpoints that note every factory a connection is made with."""

    def __init__(self, endpoints: ReusedEndpoints) -> None:
        self._endpoints = endpoints
        self.factories: list[Any] = []

    def endpointForURI(self, uri: Any) -> Any:
        endpoint = self._endpoints.endpointForURI(uri)
        recording = self

        class Recording:
            def connect(self, factory: Any) -> Any:
                recording.factories.append(factory)
                return endpoint.connect(factory)

        return Recording()


@pytest_twisted.ensureDeferred
async def test_connections_are_made_by_quiet_factories(server: Any) -> None:
    """
    Twisted logs "Starting factory" and "Stopping factory" for a factory
    that is noisy: two lines in the daemon's log per upstream connection.
    """
    endpoints = RecordingEndpoints(ReusedEndpoints(reactor, 5))
    idle = IdleConnections()
    server.agent = LeanAgent(endpoints, server.fallback, idle)
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    server.answers += [(closing, True), (answer, False)]
    try:
        for _ in range(2):
            response, data, _ = await fetch(server)
            assert response.code == 200 and data == b"{}"
    finally:
        idle.close()
    assert len(endpoints.factories) == 2  # the first connection was closed
    assert not any(factory.noisy for factory in endpoints.factories)


@pytest_twisted.ensureDeferred
async def test_a_kept_alive_connection_the_server_closed_as_idle_is_not_a_failure(
    server: Any,
) -> None:
    """
    The server closes the connection as the second request arrives, without
    a byte of answer: it had closed it as idle.  The request goes out again
    on a new connection, once; the caller sees only the answer.
    """
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server.answers += [(answer, False), (b"", True), (answer, False)]
    await fetch(server)
    response, data, _ = await fetch(server)
    assert (response.code, data) == (200, b"ok")
    assert server.connections == 2 and len(server.requests) == 3


@pytest_twisted.ensureDeferred
async def test_a_new_connection_closed_before_an_answer_is_not_tried_again(server: Any) -> None:
    server.answers += [(b"", True), (b"", True)]
    with pytest.raises(ResponseNeverReceived):
        await fetch(server)
    assert server.connections == 1 and len(server.requests) == 1


@pytest_twisted.ensureDeferred
async def test_a_reused_connection_closed_after_part_of_an_answer_fails(server: Any) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server.answers += [(answer, False), (b"HTTP/1.1 20", True), (answer, False)]
    await fetch(server)
    with pytest.raises(ResponseNeverReceived):
        await fetch(server)
    assert server.connections == 1 and len(server.requests) == 2
