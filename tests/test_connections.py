"""
Connection caps: in total, per client, and by descriptors; refused at once,
logged once then summed up, counted in metrics.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from oproxy import connections
from oproxy.config import RequestLimits
from oproxy.connections import (
    RESERVED_DESCRIPTORS,
    ConnectionLimits,
    client_of,
    connections_within,
    raise_descriptor_limit,
)
from oproxy.metrics import Metrics
from oproxy.site import ProxySite
from tests.test_failures import wait_until
from tests.test_site import Answers

# --------------------------------------------------------------------------
# Who a client is


@pytest.mark.parametrize(
    ("address", "client"),
    [
        (IPv4Address("TCP", "192.0.2.7", 5000), "192.0.2.7"),
        (IPv4Address("TCP", "127.0.0.1", 5000), "127.0.0.1"),
        (IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 5000), "2001:db8:1:2::/64"),
        (IPv6Address("TCP", "2001:db8:1:2:bbbb::9", 5000), "2001:db8:1:2::/64"),
        (IPv6Address("TCP", "::ffff:192.0.2.7", 5000), "192.0.2.7"),
        (IPv6Address("TCP", "fe80::1%eth0", 5000), "fe80::/64"),
        (UNIXAddress(None), "unix"),
        (UNIXAddress(b"/run/oproxy.sock"), "unix"),
    ],
)
def test_clients_are_addresses_ipv6_networks_or_unix(address: Any, client: str) -> None:
    assert client_of(address) == client


# --------------------------------------------------------------------------
# Counting


@dataclass
class Counted:
    limits: ConnectionLimits
    metrics: Metrics
    clock: task.Clock
    events: list[dict[str, Any]]

    def refused(self, reason: str) -> float:
        value: float = self.metrics.connections_refused.labels(reason)._value.get()
        return value

    @property
    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.events]


@pytest.fixture
def log_events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(connections, "log", Logger(observer=events.append))
    return events


def counted(events: list[dict[str, Any]], descriptors: int | None = None, **limits: Any) -> Counted:
    metrics = Metrics(CollectorRegistry())
    clock = task.Clock()
    chosen = RequestLimits(**limits)
    return Counted(
        ConnectionLimits(lambda: chosen, clock, metrics, descriptors), metrics, clock, events
    )


def test_one_client_is_capped_and_the_others_still_get_in(
    log_events: list[dict[str, Any]],
) -> None:
    c = counted(log_events, max_connections=10, max_connections_per_client=3)
    assert [c.limits.admit("198.51.100.1") for _ in range(4)] == [True, True, True, False]
    assert c.limits.admit("198.51.100.2")
    assert c.limits.open == 4
    assert c.refused("max_connections_per_client") == 1
    assert c.metrics.connections_open._value.get() == 4
    c.limits.release("198.51.100.1")
    assert c.limits.admit("198.51.100.1"), "a closed connection frees its slot"


def test_the_total_is_capped(log_events: list[dict[str, Any]]) -> None:
    c = counted(log_events, max_connections=3, max_connections_per_client=3)
    assert [c.limits.admit(f"198.51.100.{i}") for i in range(4)] == [True, True, True, False]
    assert c.refused("max_connections") == 1


def test_loopback_is_counted_like_any_client(log_events: list[dict[str, Any]]) -> None:
    c = counted(log_events, max_connections=10, max_connections_per_client=1)
    assert c.limits.admit("127.0.0.1")
    assert not c.limits.admit("127.0.0.1")
    assert c.limits.admit("127.0.0.2")


def test_forgotten_clients_take_no_memory(log_events: list[dict[str, Any]]) -> None:
    c = counted(log_events)
    for i in range(100):
        c.limits.admit(f"198.51.100.{i}")
        c.limits.release(f"198.51.100.{i}")
    assert c.limits.open == 0
    assert c.limits._per_client == {}


def test_the_descriptor_limit_lowers_the_total_and_says_so(
    log_events: list[dict[str, Any]],
) -> None:
    descriptors = RESERVED_DESCRIPTORS + 2 * 3
    assert connections_within(descriptors) == 3
    c = counted(log_events, descriptors, max_connections=100, max_connections_per_client=100)
    assert "Only 3 client connections fit" in c.lines[0]
    assert [c.limits.admit(f"198.51.100.{i}") for i in range(4)] == [True, True, True, False]
    assert c.refused("descriptors") == 1


def test_refusals_are_logged_once_then_summed_up(log_events: list[dict[str, Any]]) -> None:
    c = counted(log_events, max_connections=10, max_connections_per_client=1)
    c.limits.admit("198.51.100.1")
    for _ in range(500):
        c.limits.admit("198.51.100.1")
    c.limits.admit("198.51.100.2")
    c.limits.admit("198.51.100.2")
    assert len(c.lines) == 1
    assert "198.51.100.1" in c.lines[0] and "max_connections_per_client (1)" in c.lines[0]
    c.clock.advance(60)
    assert len(c.lines) == 2
    summary = c.lines[1]
    assert "Refused 500 connection(s) in the last 60 seconds" in summary
    assert "500 at max_connections_per_client (1)" in summary
    assert "most from 198.51.100.1 (499)" in summary
    c.clock.advance(60)  # a quiet minute: nothing to say
    assert len(c.lines) == 2
    c.clock.advance(60)
    c.limits.admit("198.51.100.1")
    assert len(c.lines) == 3, "after a quiet minute, a refusal is news again"
    assert c.refused("max_connections_per_client") == 502


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        raised = raise_descriptor_limit()
        unlimited = hard == resource.RLIM_INFINITY
        expected = (
            connections.DESCRIPTOR_CEILING
            if unlimited
            else min(connections.DESCRIPTOR_CEILING, hard)
        )
        assert raised == expected
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (expected, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --------------------------------------------------------------------------
# The site refuses before building an HTTP channel


def site_with(**limits: Any) -> ProxySite:
    chosen = RequestLimits(**limits)
    return ProxySite(
        Answers(), lambda: chosen, metrics=Metrics(CollectorRegistry()), reactor=task.Clock()
    )


def test_a_refused_connection_gets_no_http_channel() -> None:
    site = site_with(max_connections_per_client=1)
    address = IPv4Address("TCP", "198.51.100.1", 5000)
    site.buildProtocol(address).makeConnection(StringTransport(peerAddress=address))
    refused = site.buildProtocol(address)
    assert not hasattr(refused, "_channel")
    transport = StringTransport(peerAddress=address)
    refused.makeConnection(transport)
    assert transport.disconnecting
    assert transport.value() == b""
    assert site.connection_limits.open == 1


def test_a_refused_connection_behind_tls_is_closed_too(tmp_path: Any) -> None:
    """A TLS wrapper cannot take ``None`` from ``buildProtocol``."""
    from twisted.internet.ssl import DefaultOpenSSLContextFactory

    from tests.e2e.test_daemon import make_certificate

    key, cert = make_certificate(tmp_path)
    site = site_with(max_connections_per_client=1)
    tls = TLSMemoryBIOFactory(DefaultOpenSSLContextFactory(str(key), str(cert)), False, site)
    address = IPv4Address("TCP", "198.51.100.1", 5000)
    site.buildProtocol(address).makeConnection(StringTransport(peerAddress=address))
    transport = StringTransport(peerAddress=address)
    tls.buildProtocol(address).makeConnection(transport)
    assert transport.disconnecting
    assert site.connection_limits.open == 1


def test_closing_a_connection_frees_its_slot() -> None:
    site = site_with(max_connections_per_client=1)
    address = IPv4Address("TCP", "198.51.100.1", 5000)
    protocol = site.buildProtocol(address)
    protocol.makeConnection(StringTransport(peerAddress=address))
    protocol.connectionLost(Failure(ConnectionError()))
    assert site.connection_limits.open == 0
    assert site.metrics.connections_open._value.get() == 0
    assert hasattr(site.buildProtocol(address), "_channel")


# --------------------------------------------------------------------------
# Over loopback


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.ended.callback(None)


@dataclass
class Listening:
    site: ProxySite
    port: int


@pytest.fixture
def listening() -> Iterator[Any]:
    ports: list[Any] = []

    def start(**limits: Any) -> Listening:
        chosen = RequestLimits(**limits)
        site = ProxySite(Answers(), lambda: chosen, metrics=Metrics(CollectorRegistry()))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        return Listening(site, port.getHost().port)

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


async def connect_from(port: int, source: str) -> Client:
    client = Client()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    await connectProtocol(endpoint, client)
    return client


@pytest_twisted.ensureDeferred
async def test_over_loopback_a_capped_client_is_closed_and_another_address_is_served(
    listening: Any,
) -> None:
    served = listening(max_connections=10, max_connections_per_client=3)
    held = [await connect_from(served.port, "127.0.0.1") for _ in range(3)]
    await wait_until(lambda: served.site.connection_limits.open == 3)
    refused = await connect_from(served.port, "127.0.0.1")
    assert refused.transport is not None
    refused.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await refused.ended
    assert refused.received == b"", "closed without a word"
    other = await connect_from(served.port, "127.0.0.2")
    assert other.transport is not None
    other.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await other.ended
    assert other.received.startswith(b"HTTP/1.1 200 OK")
    for client in held:
        assert client.transport is not None
        client.transport.loseConnection()
        await client.ended
    await wait_until(lambda: served.site.connection_limits.open == 0)
    again = await connect_from(served.port, "127.0.0.1")
    assert again.transport is not None
    again.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await again.ended
    assert again.received.startswith(b"HTTP/1.1 200 OK")
    metrics = served.site.metrics
    assert metrics.connections_refused.labels("max_connections_per_client")._value.get() == 1
