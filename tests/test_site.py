"""
The HTTP site: deadlines for request heads and bodies, ``413`` as soon as a
body is known to be too large, reason phrases, repeated slashes, and
``415`` for bodies that are not JSON.

Deadlines are driven on a test clock over a memory transport; what lives in
real connections (a status line as a client reads it, an answer before the
body, the ``Host`` header of a raw request) goes over loopback sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from oproxy.config import AuthConfig, RequestLimits, StateConfig
from oproxy.metrics import Metrics
from oproxy.security.policy import Limits
from oproxy.site import IDLE_TIMEOUT, LINGER_SECONDS, ProxySite, reason_phrase
from tests.conftest import Proxy, listen
from tests.test_failures import error_of, wait_until

HELLO = [{"role": "user", "content": "hi"}]
CHAT = {"model": "llama3.2", "messages": HELLO}


class Answers(Resource):
    """
    ``/stream`` writes and never finishes (a long stream); ``/status/N``
    answers status N; anything else answers ``ok``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.served: list[Any] = []
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> Any:
        self.served.append(request)
        self.bodies.append(request.content.read())
        if request.path == b"/stream":
            request.write(b"first chunk")
            return NOT_DONE_YET
        if request.path.startswith(b"/status/"):
            request.setResponseCode(int(request.path.rsplit(b"/", 1)[1]))
        return b"ok"


def site_for(
    resource: Resource, clock: Any = None, metrics: Metrics | None = None, **limits: Any
) -> ProxySite:
    chosen = RequestLimits(**limits)
    return ProxySite(
        resource,
        lambda: chosen,
        metrics=metrics or Metrics(CollectorRegistry()),
        reactor=clock or reactor,
    )


@dataclass
class Connection:
    """A client connection over a memory transport."""

    protocol: Any
    transport: StringTransport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def answer(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def connect(site: ProxySite, host: str = "10.0.0.1") -> Connection:
    address = IPv4Address("TCP", host, 40000)
    protocol = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return Connection(protocol, transport)


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def error_in(answer: bytes) -> dict[str, Any]:
    return error_of(answer.split(b"\r\n\r\n", 1)[1])


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


# --------------------------------------------------------------------------
# Request heads and bodies have deadlines


def test_a_trickled_head_gets_408_at_the_head_deadline(clock: task.Clock) -> None:
    """One header line every 20 s restarts an idle timer, not a deadline."""
    resource = Answers()
    connection = connect(site_for(resource, clock, head_timeout=30))
    connection.send(b"GET / HTTP/1.1\r\n")
    for second in range(20, 140, 20):
        clock.advance(20)
        if connection.closed:
            break
        connection.send(b"X-Slow-%d: 1\r\n" % second)
    assert connection.closed
    assert clock.seconds() == 40  # the first tick past 30 s
    assert status_line(connection.answer) == b"HTTP/1.1 408 Request Timeout"
    error = error_in(connection.answer)
    assert error["code"] == "request_timeout"
    assert error["type"] == "invalid_request_error"
    assert "30 seconds" in error["message"]
    assert resource.served == []


def test_the_first_head_is_timed_from_the_connections_start(clock: task.Clock) -> None:
    connection = connect(site_for(Answers(), clock, head_timeout=30))
    clock.advance(29.9)
    assert not connection.closed
    clock.advance(0.1)
    assert connection.closed
    assert status_line(connection.answer) == b"HTTP/1.1 408 Request Timeout"


def test_a_trickled_body_gets_408_at_the_body_deadline(clock: task.Clock) -> None:
    resource = Answers()
    connection = connect(site_for(resource, clock, head_timeout=30, body_timeout=120))
    clock.advance(25)
    connection.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(11):
        clock.advance(10)
        connection.send(b"x" * 10)
    assert not connection.closed, "the head's deadline ended with the head"
    clock.advance(9.9)
    assert not connection.closed
    clock.advance(0.1)
    assert connection.closed
    assert status_line(connection.answer) == b"HTTP/1.1 408 Request Timeout"
    assert "body was not received within 120 seconds" in error_in(connection.answer)["message"]
    assert resource.served == []


def test_a_kept_alive_connection_idles_between_requests_until_the_idle_timeout(
    clock: task.Clock,
) -> None:
    resource = Answers()
    connection = connect(site_for(resource, clock, head_timeout=30))
    connection.send(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_line(connection.answer) == b"HTTP/1.1 200 OK"
    connection.transport.clear()
    clock.advance(100)  # past the head deadline, within the idle timeout
    assert not connection.closed
    connection.send(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_line(connection.answer) == b"HTTP/1.1 200 OK"
    assert [r.path for r in resource.served] == [b"/one", b"/two"]
    connection.transport.clear()
    clock.advance(IDLE_TIMEOUT)
    assert connection.closed
    assert connection.answer == b"", "an idle connection is closed without an answer"


def test_the_next_request_on_a_kept_alive_connection_has_its_own_head_deadline(
    clock: task.Clock,
) -> None:
    connection = connect(site_for(Answers(), clock, head_timeout=30))
    connection.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(100)
    connection.transport.clear()
    connection.send(b"GET / HTTP/1.1\r\n")
    clock.advance(29)
    connection.send(b"Host: x\r\n")
    assert not connection.closed
    clock.advance(1)
    assert connection.closed
    assert status_line(connection.answer) == b"HTTP/1.1 408 Request Timeout"


def test_a_pipelined_head_is_timed_once_the_request_before_it_is_answered(
    clock: task.Clock,
) -> None:
    resource = Answers()
    connection = connect(site_for(resource, clock, head_timeout=30))
    connection.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\n")
    clock.advance(300)
    assert not connection.closed, "nothing is timed while a request is answered"
    resource.served[0].finish()
    clock.advance(29)
    assert not connection.closed
    clock.advance(1)
    assert connection.closed
    assert b"408 Request Timeout" in connection.answer


def test_a_stream_is_cut_by_no_deadline_and_no_idle_timeout(clock: task.Clock) -> None:
    resource = Answers()
    connection = connect(site_for(resource, clock, head_timeout=1, body_timeout=1))
    connection.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(10):
        clock.advance(IDLE_TIMEOUT)
        resource.served[0].write(b"another chunk")
    assert not connection.closed
    assert b"408" not in connection.answer
    resource.served[0].finish()
    assert not connection.closed


def test_deadlines_follow_the_limits_in_force(clock: task.Clock) -> None:
    limits = [RequestLimits(head_timeout=30)]
    site = ProxySite(
        Answers(), lambda: limits[-1], metrics=Metrics(CollectorRegistry()), reactor=clock
    )
    first = connect(site)
    limits.append(RequestLimits(head_timeout=5))
    second = connect(site)
    clock.advance(5)
    assert second.closed and not first.closed
    clock.advance(25)
    assert first.closed


def test_timeouts_are_counted_by_phase(clock: task.Clock) -> None:
    metrics = Metrics(CollectorRegistry())
    site = site_for(Answers(), clock, metrics, head_timeout=1, body_timeout=1)
    connect(site)
    connect(site).send(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
    clock.advance(1)
    assert metrics.request_read_timeouts.labels("head")._value.get() == 1
    assert metrics.request_read_timeouts.labels("body")._value.get() == 1


def test_a_refused_request_lingers_then_is_cut(clock: task.Clock) -> None:
    """
    After a refusal the write side is closed and the rest is read and
    dropped for a while, so a client busy sending reads the answer.
    """

    class HalfClosing(StringTransport):
        write_closed = False
        aborted = False

        def loseWriteConnection(self) -> None:
            self.write_closed = True

        def abortConnection(self) -> None:
            self.aborted = True

    site = site_for(Answers(), clock, max_body_bytes=10)
    address = IPv4Address("TCP", "10.0.0.1", 40000)
    protocol = site.buildProtocol(address)
    transport = HalfClosing(peerAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
    assert b"413" in transport.value()
    assert transport.write_closed and not transport.aborted
    protocol.dataReceived(b"x" * 50)  # dropped
    clock.advance(LINGER_SECONDS)
    assert transport.aborted


# --------------------------------------------------------------------------
# 413 as soon as the body is known to be too large


@pytest.mark.parametrize("length", [33 * 1024 * 1024, 10**15])
def test_an_announced_length_over_the_cap_gets_413_at_once(length: int) -> None:
    resource = Answers()
    connection = connect(site_for(resource, task.Clock()))
    connection.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )
    assert status_line(connection.answer) == b"HTTP/1.1 413 Request Entity Too Large"
    assert b"\r\nconnection: close\r\n" in connection.answer
    error = error_in(connection.answer)
    assert error["message"] == "Request body is larger than the limit of 33554432 bytes."
    assert error["code"] == "request_too_large"
    assert connection.closed
    assert resource.served == []


def test_expect_100_continue_over_the_cap_gets_only_the_413() -> None:
    connection = connect(site_for(Answers(), task.Clock(), max_body_bytes=10))
    connection.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n"
    )
    assert status_line(connection.answer) == b"HTTP/1.1 413 Request Entity Too Large"
    assert b"100 Continue" not in connection.answer


def test_a_chunked_body_gets_413_as_soon_as_it_passes_the_cap() -> None:
    resource = Answers()
    metrics = Metrics(CollectorRegistry())
    connection = connect(site_for(resource, task.Clock(), metrics, max_body_bytes=100))
    connection.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    connection.send(b"3c\r\n" + b"x" * 60 + b"\r\n")
    assert connection.answer == b""
    connection.send(b"3c\r\n" + b"x" * 60 + b"\r\n")  # no end yet
    assert status_line(connection.answer) == b"HTTP/1.1 413 Request Entity Too Large"
    assert "limit of 100 bytes" in error_in(connection.answer)["message"]
    assert connection.closed
    connection.send(b"0\r\n\r\n")
    assert resource.served == [], "the request is never served"
    assert metrics.rejections.labels("request_too_large")._value.get() == 1


def test_a_body_within_the_cap_is_served() -> None:
    resource = Answers()
    connection = connect(site_for(resource, task.Clock(), max_body_bytes=100))
    connection.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    assert status_line(connection.answer) == b"HTTP/1.1 200 OK"
    assert resource.bodies == [b"x" * 100]


def test_native_routes_get_the_413_in_ollamas_shape() -> None:
    connection = connect(site_for(Answers(), task.Clock(), max_body_bytes=10))
    connection.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    body = orjson.loads(connection.answer.split(b"\r\n\r\n", 1)[1])
    assert body == {"error": "Request body is larger than the limit of 10 bytes."}


# --------------------------------------------------------------------------
# Over loopback: what a client reads


class RawClient(Protocol):
    """Sends bytes as told; keeps what comes back and notes the end."""

    def __init__(self) -> None:
        self.received = b""
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.ended.callback(None)


async def raw(url: str, data: bytes = b"") -> RawClient:
    port = int(url.rsplit(":", 1)[1])
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    if data:
        assert client.transport is not None
        client.transport.write(data)
    return client


@dataclass
class Served:
    url: str
    resource: Answers = field(default_factory=Answers)


@pytest.fixture
def served() -> Iterator[Served]:
    resource = Answers()
    running = listen(site_for(resource, max_body_bytes=1024))
    yield Served(running.url, resource)
    pytest_twisted.blockon(running.port.stopListening())


@pytest.mark.parametrize("code", [200, 308, 408, 413, 415, 422, 429, 431, 451, 499, 503, 504])
@pytest_twisted.ensureDeferred
async def test_every_status_has_its_standard_reason_phrase(served: Served, code: int) -> None:
    client = await raw(served.url, b"GET /status/%d HTTP/1.1\r\nHost: x\r\n\r\n" % code)
    await wait_until(lambda: b"\r\n\r\n" in client.received)
    assert status_line(client.received) == b"HTTP/1.1 %d %s" % (code, reason_phrase(code))
    assert b"Unknown Status" not in client.received
    assert client.transport is not None
    client.transport.loseConnection()


def test_reason_phrases_are_the_standard_ones() -> None:
    assert reason_phrase(429) == b"Too Many Requests"
    assert reason_phrase(422) == b"Unprocessable Entity"
    assert reason_phrase(451) == b"Unavailable For Legal Reasons"
    assert reason_phrase(499) == b"Client Closed Request"
    assert reason_phrase(599) == b"Server Error"


@pytest_twisted.ensureDeferred
async def test_a_rate_limited_answer_says_too_many_requests(
    proxy_factory: Any, tmp_path: Path
) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(anonymous_limits=Limits(rpm=1)),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    body = orjson.dumps(CHAT)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    client = await raw(proxy.url, request + request)
    await wait_until(lambda: client.received.count(b"HTTP/1.1 ") == 2)
    second = client.received[client.received.rindex(b"HTTP/1.1 ") :]
    assert status_line(second) == b"HTTP/1.1 429 Too Many Requests"
    assert client.transport is not None
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_client_sending_a_large_body_reads_the_413_at_once(served: Served) -> None:
    """The answer comes while the body is still on its way (it never comes)."""
    client = await raw(
        served.url,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\n\r\n" + b"x" * 4096,
    )
    await client.ended
    assert status_line(client.received) == b"HTTP/1.1 413 Request Entity Too Large"
    assert "limit of 1024 bytes" in error_in(client.received)["message"]
    assert served.resource.served == []


# --------------------------------------------------------------------------
# Repeated slashes are served; no answer names the client's Host


EVIL = b"evil.example"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (b"//v1//models", 200),
        (b"///v1/models", 200),
        (b"/v1//models/", 404),
        (b"//healthz", 200),
        (b"/v1/%2Fmodels", 308),
        (b"//docs", 200),
        (b"//", 200),
    ],
)
@pytest_twisted.ensureDeferred
async def test_no_answer_points_at_the_clients_host(proxy: Proxy, path: bytes, status: int) -> None:
    client = await raw(
        proxy.url, b"GET " + path + b" HTTP/1.1\r\nHost: " + EVIL + b"\r\nConnection: close\r\n\r\n"
    )
    await client.ended
    assert status_line(client.received).startswith(b"HTTP/1.1 %d " % status)
    assert EVIL not in client.received
    if status == 308:
        head = client.received.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\r\nlocation: /v1/models\r\n" in head


@pytest_twisted.ensureDeferred
async def test_a_path_with_repeated_slashes_is_served_as_the_route(proxy: Proxy) -> None:
    client = await raw(
        proxy.url, b"GET //v1//models HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    await client.ended
    body = orjson.loads(client.received.split(b"\r\n\r\n", 1)[1])
    assert body["object"] == "list"


# --------------------------------------------------------------------------
# 415 for bodies that are not JSON


async def post(
    proxy: Proxy, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    response = await proxy.client.post(f"{proxy.url}{path}", data=body, headers=headers)
    raw_body = await response.content()
    return response.code, orjson.loads(raw_body)


FORM_LIKE = [
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/xml",
]


@pytest.mark.parametrize("content_type", FORM_LIKE)
@pytest.mark.parametrize("origin", [None, "https://evil.example"])
@pytest_twisted.ensureDeferred
async def test_openai_routes_refuse_what_is_not_json(
    proxy: Proxy, content_type: str, origin: str | None
) -> None:
    headers = {"Content-Type": content_type, **({"Origin": origin} if origin else {})}
    code, body = await post(proxy, "/v1/chat/completions", orjson.dumps(CHAT), headers)
    assert code == 415
    error = error_of(orjson.dumps(body))
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]
    assert proxy.fake.stats.requests == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "application/vnd.api+json",
    ],
)
@pytest_twisted.ensureDeferred
async def test_openai_routes_take_json_media_types(proxy: Proxy, content_type: str) -> None:
    code, body = await post(
        proxy, "/v1/chat/completions", orjson.dumps(CHAT), {"Content-Type": content_type}
    )
    assert code == 200, body


@pytest_twisted.ensureDeferred
async def test_no_content_type_is_taken_only_from_a_client_that_is_not_a_browser(
    proxy: Proxy,
) -> None:
    code, _ = await post(proxy, "/v1/chat/completions", orjson.dumps(CHAT), {})
    assert code == 200
    code, body = await post(
        proxy, "/v1/chat/completions", orjson.dumps(CHAT), {"Origin": "https://evil.example"}
    )
    assert code == 415
    assert "none" in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_native_routes_take_curl_d_but_not_from_a_page(proxy: Proxy) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    code, body = await post(proxy, "/api/chat", orjson.dumps({**CHAT, "stream": False}), form)
    assert code == 200, body
    code, body = await post(
        proxy, "/api/chat", orjson.dumps(CHAT), {**form, "Origin": "https://evil.example"}
    )
    assert code == 415
    assert set(body) == {"error"}, "Ollama's error shape"
    assert "application/json" in body["error"]
    code, body = await post(proxy, "/api/chat", orjson.dumps(CHAT), {"Content-Type": "text/plain"})
    assert code == 415


@pytest_twisted.ensureDeferred
async def test_415_comes_after_the_key_check(proxy_factory: Any) -> None:
    from oproxy.config import APIKey
    from oproxy.security.keys import hash_key

    proxy = proxy_factory(auth=AuthConfig(keys=(APIKey("a", hash_key("sk-a")),)))
    code, _ = await post(
        proxy, "/v1/chat/completions", orjson.dumps(CHAT), {"Content-Type": "text/plain"}
    )
    assert code == 401
