"""
Shared fixtures: a fake Ollama and the proxy, both on real loopback sockets
inside the test process, driven by the real reactor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import treq
from attrs import evolve
from twisted.internet import reactor, task
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from oproxy.app import ProxyApp
from oproxy.config import BackendConfig, Config, ImagesConfig, Timeouts
from oproxy.logs import AccessLog
from oproxy.tap import build_app, build_site, connection_pool
from oproxy.testing import FakeOllama


@dataclass
class Running:
    """A server listening on loopback."""

    url: str
    port: Any


def listen(site: Site) -> Running:
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return Running(url=f"http://127.0.0.1:{port.getHost().port}", port=port)


#: A ``sitecustomize`` that saves coverage data in daemons that end by
#: signalling themselves (``twistd`` on SIGTERM); see its docstring.
COVERAGE_HOOK = os.path.join(os.path.dirname(__file__), "coverage_hook")


@pytest.fixture(autouse=True, scope="session")
def measure_the_daemons_too() -> Iterator[None]:
    """
    Under coverage (``coverage run -m pytest``), the processes the tests
    start are measured as well: coverage hands them its settings through
    the environment, and the hook on ``PYTHONPATH`` saves their data when
    ``twistd`` ends them with the signal that stopped it.
    """
    if not os.environ.get("COVERAGE_PROCESS_CONFIG"):
        yield
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [COVERAGE_HOOK, saved]))
    yield
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(autouse=True, scope="session")
def private_state_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """
    Keep every proxy's default state store (and every daemon's the tests
    start) out of the home directory.
    """
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(autouse=True)
def private_state_per_test(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A state store of its own for every test's proxies: circuits (like keys
    and limits) live there, and a backend one test broke must not be out
    in the next test that gives a backend the same name.
    """
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


@pytest.fixture
def fake_ollama() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama(reactor)
    running = listen(Site(fake.resource()))
    yield fake, running.url
    pytest_twisted.blockon(running.port.stopListening())


@dataclass
class Proxy:
    """The proxy under test, its fake Ollama, and a client for both."""

    url: str
    app: ProxyApp
    fake: FakeOllama
    fake_url: str
    client: treq.client.HTTPClient

    def v1(self, path: str) -> str:
        return f"{self.url}/v1/{path.lstrip('/')}"

    async def settled(self) -> None:
        """Wait until the requests answered so far are counted and logged."""
        while self.app.after_send.waiting:
            await task.deferLater(reactor, 0, lambda: None)


def proxy_config(
    fake_url: str,
    timeouts: Timeouts | None = None,
    host_header: str | None = None,
    **changes: Any,
) -> Config:
    backend = BackendConfig(
        name="local",
        type="ollama",
        url=fake_url,
        timeouts=timeouts or Timeouts(),
        host_header=host_header,
    )
    config = Config(
        backends=(backend,),
        images=ImagesConfig(allow_private_networks=True),
    )
    return evolve(config, **changes)


@pytest.fixture
def proxy_factory(fake_ollama: tuple[FakeOllama, str]) -> Iterator[Any]:
    """Start proxies with a config derived from the defaults; stop them afterwards."""
    fake, fake_url = fake_ollama
    cleanups: list[Any] = []
    client_pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=client_pool))

    def start(
        timeouts: Timeouts | None = None, host_header: str | None = None, **changes: Any
    ) -> Proxy:
        config = proxy_config(fake_url, timeouts, host_header, **changes)
        pool = connection_pool(reactor)
        access_log = AccessLog(config.access_log.path) if config.access_log else None
        app = build_app(config, reactor, pool, access_log)
        app.guard.start()
        running = listen(build_site(app))
        cleanups.append(app.guard.close)
        cleanups.append(running.port.stopListening)
        cleanups.append(pool.closeCachedConnections)
        return Proxy(url=running.url, app=app, fake=fake, fake_url=fake_url, client=client)

    yield start
    for cleanup in reversed(cleanups):
        pytest_twisted.blockon(cleanup())


@pytest.fixture
def proxy(proxy_factory: Any) -> Proxy:
    started: Proxy = proxy_factory()
    return started
