"""
The lines that say at start what serves where, and how each backend is.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from oproxy.after_send import AfterSend
from oproxy.announce import backend_line, bound_address, listener_line, without_credentials
from oproxy.config import BackendConfig, RequestLimits
from oproxy.health import BackendHealth, ProbeService
from oproxy.service import ProxyService, Resources
from oproxy.site import ProxySite
from oproxy.tap import _listen_now
from tests.conftest import Proxy

VERSION_PREFIX = "oproxy 0.1.0 serving the OpenAI API at "
PATHS = "(docs /docs, metrics /metrics)"


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every event logged while the test runs."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize(
    ("description", "address", "url"),
    [
        (
            "tcp:8000:interface=127.0.0.1",
            IPv4Address("TCP", "127.0.0.1", 8000),
            "http://127.0.0.1:8000/v1",
        ),
        ("tcp6:8000:interface=\\:\\:1", IPv6Address("TCP", "::1", 8000), "http://[::1]:8000/v1"),
        (
            "ssl:8443:privateKey=k.pem",
            IPv4Address("TCP", "0.0.0.0", 8443),
            "https://0.0.0.0:8443/v1",
        ),
        ("tls:/etc/oproxy/certs:port=443", ("10.0.0.1", 443), "https://10.0.0.1:443/v1"),
        ("systemd:domain=INET:index=0", ("127.0.0.1", 8000), "http://127.0.0.1:8000/v1"),
        ("tcp:0", ("::", 41234, 0, 0), "http://[::]:41234/v1"),
    ],
)
def test_a_listener_line_gives_the_url_a_client_uses(
    description: str, address: object, url: str
) -> None:
    assert listener_line(description, address) == f"{VERSION_PREFIX}{url} {PATHS}"


def test_a_unix_listener_line_gives_the_path() -> None:
    for address in (UNIXAddress(b"/run/oproxy.sock"), "/run/oproxy.sock", b"/run/oproxy.sock"):
        assert listener_line("unix:/run/oproxy.sock", address) == (
            f"{VERSION_PREFIX}unix:/run/oproxy.sock (API /v1, docs /docs, metrics /metrics)"
        )
    assert bound_address("\0oproxy") == "@oproxy"


def test_with_workers_the_line_says_how_many() -> None:
    line = listener_line("tcp:8000", ("127.0.0.1", 8000), workers=4)
    assert line == f"{VERSION_PREFIX}http://127.0.0.1:8000/v1 {PATHS} with 4 worker processes"


LOCAL = BackendConfig(name="local", type="ollama", url="http://127.0.0.1:11434")


def test_backend_lines() -> None:
    up = BackendHealth(name="local", reachable=True, latency_seconds=0.01, models_available=6)
    assert backend_line(LOCAL, up, 6) == (
        "Backend local: Ollama at http://127.0.0.1:11434 (reachable, 6 models)"
    )
    assert backend_line(LOCAL, up, 1).endswith("(reachable, 1 model)")
    vllm = BackendConfig(name="gpu", type="openai", url="https://gpu.internal:8000")
    assert backend_line(vllm, up, None) == (
        "Backend gpu: OpenAI-compatible server at https://gpu.internal:8000 (reachable)"
    )
    down = BackendHealth(
        name="local", reachable=False, latency_seconds=0.01, error="connection refused"
    )
    assert backend_line(LOCAL, down, None).endswith("(not reachable: connection refused)")
    odd = BackendHealth(
        name="local", reachable=False, latency_seconds=0.01, error="HTTP 404", answered=True
    )
    assert backend_line(LOCAL, odd, None).endswith("(answers, but not as expected: HTTP 404)")


def test_credentials_in_a_url_are_not_logged() -> None:
    assert without_credentials("http://user:secret@host:8000/x") == "http://host:8000/x"
    assert without_credentials("http://host:8000") == "http://host:8000"


class NothingToClose:
    """A guard, cache and pool that open and close nothing."""

    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    close = stop
    closeCachedConnections = stop


def serving(site: ProxySite, descriptions: list[str], *, announce: bool) -> ProxyService:
    """A serving process's tree over ``site``, with nothing else to open."""
    nothing = NothingToClose()
    return ProxyService(
        reactor,
        Resources(
            guard=nothing,  # type: ignore[arg-type]
            cache=lambda: nothing,  # type: ignore[arg-type,return-value]
            pool=nothing,
            after_send=AfterSend(reactor),
            access_log=None,
            draining=lambda: None,
        ),
        make_site=lambda: site,
        bind=lambda site: [_listen_now(reactor, d, site) for d in descriptions],
        drain_timeout=lambda: 1.0,
        descriptions=descriptions if announce else None,
    )


@pytest_twisted.ensureDeferred
async def test_a_serving_process_says_the_port_it_really_bound(
    logged: list[str], proxy: Proxy, tmp_path: Path
) -> None:
    site = ProxySite(Resource(), RequestLimits, metrics=proxy.app.metrics)
    descriptions = ["tcp:0:interface=127.0.0.1", f"unix:{tmp_path}/s.sock"]
    top = serving(site, descriptions, announce=True)
    top.privilegedStartService()
    top.startService()
    try:
        port = top.ports[0].getHost().port
        assert port != 0
        said = [line for line in logged if line.startswith(VERSION_PREFIX)]
        assert said == [
            f"{VERSION_PREFIX}http://127.0.0.1:{port}/v1 {PATHS}",
            f"{VERSION_PREFIX}unix:{tmp_path}/s.sock (API /v1, docs /docs, metrics /metrics)",
        ]
    finally:
        await top.stopService()


@pytest_twisted.ensureDeferred
async def test_a_worker_says_nothing_of_its_listeners(logged: list[str], proxy: Proxy) -> None:
    site = ProxySite(Resource(), RequestLimits, metrics=proxy.app.metrics)
    top = serving(site, ["tcp:0:interface=127.0.0.1"], announce=False)
    top.privilegedStartService()
    top.startService()
    await top.stopService()
    assert not [line for line in logged if line.startswith(VERSION_PREFIX)]


@pytest_twisted.ensureDeferred
async def test_the_first_probe_is_reported_once(proxy: Proxy) -> None:
    rounds: list[list[BackendHealth]] = []
    first_seen: defer.Deferred[None] = defer.Deferred()

    def first_round(found: list[BackendHealth]) -> None:
        rounds.append(found)
        first_seen.callback(None)

    probes = ProbeService(proxy.app, reactor, interval=0.01, first_round=first_round)
    probes.startService()
    try:
        await first_seen
        # Later rounds run, and are not reported.
        for _ in range(3):
            await probes._probe()
    finally:
        probes.stopService()
    assert len(rounds) == 1
    assert [(h.name, h.reachable) for h in rounds[0]] == [("local", True)]
    # The model lists are known by then, for the count of servers whose probe has none.
    assert proxy.app.router.state.catalog.known("local")


def test_listener_addresses_from_sockets_and_ports() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert bound_address(sock.getsockname()) == ("127.0.0.1", sock.getsockname()[1])
    address: Any = IPv4Address("TCP", "127.0.0.1", 1)
    assert bound_address(address) == ("127.0.0.1", 1)
