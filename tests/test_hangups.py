"""
Clients that hang up before their answer is complete, on real loopback
sockets: mid-stream, while a whole answer is awaited, while the model loads
(the keep-alive phase), and while the relay waits for a client that reads
too slowly.

A hang-up is the client's doing, not a failure of the proxy's: the model
stops generating (the fake counts the generation as aborted), the request
is recorded as status 499 with the error kind ``client_closed`` (access
line, JSON access record, ``oproxy_requests_total``), and nothing is logged
as an error, so nothing reaches Sentry.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncGenerator, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import pytest_twisted
import sentry_sdk
from twisted.internet import defer, reactor, task, tcp, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.server import Site

from oproxy.config import AccessLogConfig, SentryConfig, StreamingConfig
from oproxy.reporting import start_reporting, stop_reporting
from oproxy.streaming import KEEPALIVE, ClientPacer, connection_lost, relay_sse
from oproxy.upstream import BodyReader
from tests.conftest import Proxy, listen
from tests.httputil import RawClient
from tests.test_failures import wait_until
from tests.test_reporting import EnvelopeReceiver, events

HELLO = [{"role": "user", "content": "hi"}]

#: Each route's request for the slow model (a token every 50 ms), and what
#: marks a chunk of its streamed answer.
ROUTES = {
    "/v1/chat/completions": ({"model": "slow", "messages": HELLO}, b"data: "),
    "/v1/completions": ({"model": "slow", "prompt": "hi"}, b"data: "),
    "/v1/responses": ({"model": "slow", "input": "hi"}, b"data: "),
    "/v1/messages": ({"model": "slow", "max_tokens": 4000, "messages": HELLO}, b"data: "),
    "/api/chat": ({"model": "slow", "messages": HELLO}, b'"done":false'),
    "/api/generate": ({"model": "slow", "prompt": "hi"}, b'"done":false'),
}


class _Quietly(Factory):
    """Connects one protocol without the "Starting factory" log lines."""

    noisy = False

    def __init__(self, protocol: RawClient) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> RawClient:
        return self._protocol


async def send(url: str, path: str, body: Any, *, small: bool = False) -> RawClient:
    """
    Send one request on a raw socket that can be hung up at any moment.

    :param small: give both ends of the connection small socket buffers,
        as on a slow link, so that the proxy soon has to wait for the client.
    """
    parts = urlsplit(url)
    client = RawClient()
    await TCP4ClientEndpoint(reactor, parts.hostname, parts.port).connect(_Quietly(client))
    if small:
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        here = client.transport.getHost()
        await wait_until(lambda: _accepted(here) is not None)
        proxy_end = _accepted(here)
        assert proxy_end is not None
        proxy_end.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = orjson.dumps(body)
    client.transport.write(
        b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload)
    )
    return client


def _accepted(client: Any) -> Any:
    """The proxy's end of the connection from the ``client`` address."""
    for selectable in reactor.getReaders():
        peer = getattr(selectable, "getPeer", None)
        if isinstance(selectable, tcp.Server) and peer is not None and peer() == client:
            return selectable
    return None


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every log event emitted while the test runs."""
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def failures(seen: list[LogEvent]) -> list[str]:
    """Events a hang-up must never cause: failures, warnings, errors."""
    return [
        formatEvent(e) + (e["log_failure"].getTraceback() if e.get("log_failure") else "")
        for e in seen
        if e.get("log_failure") is not None or e.get("log_level", LogLevel.info) >= LogLevel.warn
    ]


def requests_total(proxy: Proxy, route: str) -> dict[str, float]:
    """``oproxy_requests_total`` for ``route``, by status."""
    registry = proxy.app.metrics.registry
    assert registry is not None
    return {
        sample.labels["status"]: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "oproxy_requests_total" and sample.labels["route"] == route
    }


async def warm_up(proxy: Proxy, route: str) -> None:
    """
    One quick whole answer first, so that the catalogue is known and an
    upstream connection pooled; then the log is quiet.
    """
    body, _ = ROUTES[route]
    client = await send(proxy.url, route, {**body, "model": "llama3.2", "stream": False})
    await wait_until(lambda: requests_total(proxy, route) == {"200": 1.0})
    # Counted once sent, which may be before the client has read it.
    await wait_until(lambda: b"\r\n\r\n" in client.received)
    assert client.received.startswith(b"HTTP/1.1 200 OK")
    client.transport.loseConnection()
    await proxy.settled()


async def hang_up(proxy: Proxy, route: str, *, stream: bool) -> RawClient:
    """
    Ask the slow model, and hang up after the first chunks of the stream,
    or while the whole answer is being generated.
    """
    body, marker = ROUTES[route]
    started = proxy.fake.stats.started
    client = await send(proxy.url, route, {**body, "stream": stream})
    if stream:
        await wait_until(lambda: client.received.count(marker) >= 2)
    else:
        await wait_until(lambda: proxy.fake.stats.started == started + 1)
    client.transport.loseConnection()
    return client


async def counted(proxy: Proxy, route: str, hang_ups: int = 1) -> None:
    """Wait until the generations have stopped and the hang-ups are counted."""
    await wait_until(lambda: proxy.fake.stats.aborted == hang_ups)
    await wait_until(lambda: requests_total(proxy, route).get("499") == hang_ups)
    await proxy.settled()


def lines(seen: list[LogEvent]) -> list[str]:
    """What the proxy said, without Twisted's own connection chatter.

    Twisted logs at info level when a client factory starts or stops and
    when a server times out an idle client; those come from the fixtures'
    pooled connections of earlier tests, whenever their timers fire, and say
    nothing about the hang-up. Warnings from anywhere are caught by
    :func:`failures`.
    """
    return [
        formatEvent(e)
        for e in seen
        if not (
            e.get("log_namespace", "").startswith("twisted.")
            and e.get("log_level", LogLevel.info) <= LogLevel.info
        )
    ]


ROUTES_BOTH_WAYS = pytest.mark.parametrize(
    ("route", "stream"),
    [(route, stream) for route in ROUTES for stream in (True, False)],
    ids=[f"{route}-{'stream' if s else 'whole'}" for route in ROUTES for s in (True, False)],
)


@ROUTES_BOTH_WAYS
@pytest_twisted.ensureDeferred
async def test_a_hang_up_is_the_clients_doing_and_stops_the_model(
    proxy: Proxy, logged: list[LogEvent], route: str, stream: bool
) -> None:
    await warm_up(proxy, route)
    del logged[:]
    await hang_up(proxy, route, stream=stream)
    await counted(proxy, route)
    assert failures(logged) == []
    # One line says what happened, the access line; nothing else is logged.
    (line,) = lines(logged)
    assert f'"POST {route} HTTP/1.1" 499 ' in line
    assert requests_total(proxy, route) == {"200": 1.0, "499": 1.0}
    assert (proxy.fake.stats.completed, proxy.fake.stats.in_flight) == (1, 0)


@ROUTES_BOTH_WAYS
@pytest_twisted.ensureDeferred
async def test_the_access_record_says_the_client_closed(
    proxy_factory: Any, tmp_path: Any, logged: list[LogEvent], route: str, stream: bool
) -> None:
    path = tmp_path / "access.log"
    proxy = proxy_factory(access_log=AccessLogConfig(path=str(path)))
    await warm_up(proxy, route)
    del logged[:]
    await hang_up(proxy, route, stream=stream)
    await counted(proxy, route)
    # With the JSON access log, the record is the only trace.
    assert lines(logged) == []
    warm, record = (orjson.loads(line) for line in path.read_bytes().splitlines())
    assert (warm["status"], warm["error"]) == (200, None)
    assert record["path"] == route
    assert (record["status"], record["error"]) == (499, "client_closed")
    assert record["backend"] == "local"


# --------------------------------------------------------------------------
# While the model loads, and while the client reads too slowly


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest_twisted.ensureDeferred
async def test_a_hang_up_while_the_model_loads(
    proxy_factory: Any, logged: list[LogEvent], route: str
) -> None:
    proxy = proxy_factory(streaming=StreamingConfig(keepalive_after=0.05, keepalive_interval=0.05))
    cold = proxy.fake.models.find("cold")
    assert cold is not None
    proxy.fake.models.add(replace(cold, load_delay=30.0))
    await warm_up(proxy, route)
    del logged[:]
    body, _ = ROUTES[route]
    client = await send(proxy.url, route, {**body, "model": "cold", "stream": True})
    await wait_until(lambda: client.received.count(KEEPALIVE) >= 2)
    assert b"data: " not in client.received
    client.transport.loseConnection()
    await counted(proxy, route)
    assert failures(logged) == []
    (line,) = lines(logged)
    assert f'"POST {route} HTTP/1.1" 499 ' in line
    assert (proxy.fake.stats.completed, proxy.fake.stats.in_flight) == (1, 0)


@pytest.mark.parametrize("route", list(ROUTES))
@pytest_twisted.ensureDeferred
async def test_a_hang_up_while_the_relay_waits_for_a_slow_reader(
    proxy: Proxy, logged: list[LogEvent], monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    paused: list[ClientPacer] = []
    pause = ClientPacer.pauseProducing

    def noting(pacer: ClientPacer) -> None:
        paused.append(pacer)
        pause(pacer)

    monkeypatch.setattr(ClientPacer, "pauseProducing", noting)
    slow = proxy.fake.models.find("slow")
    assert slow is not None
    # Long enough (5 s at least) that the client's buffers fill long before the end.
    proxy.fake.models.add(
        replace(slow, name="flood:latest", min_token_delay=0.0005, answer_tokens=10_000)
    )
    await warm_up(proxy, route)
    del logged[:]
    body, _ = ROUTES[route]
    client = await send(proxy.url, route, {**body, "model": "flood", "stream": True}, small=True)
    client.transport.pauseProducing()  # reads nothing
    await wait_until(lambda: bool(paused) and paused[0].paused)
    client.transport.abortConnection()
    await counted(proxy, route)
    assert failures(logged) == []
    (line,) = lines(logged)
    assert f'"POST {route} HTTP/1.1" 499 ' in line
    assert (proxy.fake.stats.completed, proxy.fake.stats.in_flight) == (1, 0)


# --------------------------------------------------------------------------
# Error reporting


@pytest.fixture
def sentry_dsn() -> Iterator[tuple[EnvelopeReceiver, str]]:
    """A Sentry server on loopback, and the DSN that sends events to it."""
    resource = EnvelopeReceiver()
    running = listen(Site(resource))
    port = running.url.rsplit(":", 1)[1]
    yield resource, f"http://public@127.0.0.1:{port}/42"
    pytest_twisted.blockon(running.port.stopListening())


@pytest_twisted.ensureDeferred
async def test_nothing_reaches_sentry(
    proxy: Proxy, sentry_dsn: tuple[EnvelopeReceiver, str]
) -> None:
    resource, dsn = sentry_dsn
    observer = start_reporting(SentryConfig(dsn=dsn))
    try:
        for route in ROUTES:
            await hang_up(proxy, route, stream=True)
            await hang_up(proxy, route, stream=False)
        await wait_until(lambda: proxy.fake.stats.aborted == 2 * len(ROUTES))
        await proxy.settled()
        await threads.deferToThread(sentry_sdk.flush, 10)
    finally:
        stop_reporting(observer)
        sentry_sdk.get_client().close()
    assert events(resource.envelopes) == []
    for route in ROUTES:
        assert requests_total(proxy, route) == {"499": 2.0}


# --------------------------------------------------------------------------
# The two causes, in memory


def test_a_cancelled_wait_for_upstream_lines_closes_the_connection_once() -> None:
    reader = BodyReader(task.Clock(), 30.0, "local", 1024)
    upstream = StringTransport()
    reader.makeConnection(upstream)
    waiting = defer.Deferred.fromCoroutine(reader.next_lines())
    waiting.cancel()  # the client went away
    assert upstream.producerState == "stopped"  # the model stops generating
    outcome: list[Failure] = []
    waiting.addErrback(outcome.append)
    assert outcome[0].check(defer.CancelledError)
    # The aborted connection ends a turn later; the wait is not woken again.
    reader.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    reader.connectionLost(Failure(ResponseDone()))


async def _chunks(queue: defer.DeferredQueue[Any]) -> AsyncGenerator[Any, None]:
    """What the queue is given, up to ``None``."""
    while (chunk := await queue.get()) is not None:
        yield chunk


def test_a_relay_cut_short_by_its_client_ends_with_the_cancellation() -> None:
    clock = task.Clock()
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    request = http.Request(channel)
    queue: defer.DeferredQueue[Any] = defer.DeferredQueue()
    queue.put({"n": 1})
    running = defer.Deferred.fromCoroutine(relay_sse(request, _chunks(queue), clock))
    clock.advance(0)
    clock.advance(0)
    assert request.producer is not None  # paced by the client's socket
    # What Klein does when the connection is lost: the request hears of it,
    # then the handler is cancelled.
    request.connectionLost(Failure(ConnectionLost()))
    assert connection_lost(request)
    running.cancel()
    outcome: list[Failure] = []
    running.addErrback(outcome.append)
    assert outcome[0].check(defer.CancelledError), outcome[0].getTraceback()


def test_a_relay_that_ends_with_its_client_connected_lets_go_of_the_socket() -> None:
    clock = task.Clock()
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    request = http.Request(channel)
    queue: defer.DeferredQueue[Any] = defer.DeferredQueue()
    queue.put({"n": 1})
    running = defer.Deferred.fromCoroutine(relay_sse(request, _chunks(queue), clock))
    clock.advance(0)
    clock.advance(0)
    queue.put(None)
    assert not connection_lost(request)
    assert request.producer is None
    outcome: list[Any] = []
    running.addBoth(outcome.append)
    assert outcome == [None]
