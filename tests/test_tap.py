"""
``makeService``: it builds a tree and does nothing else; the tree binds when
started and closes what it opened when stopped, in order.

Tested as Twisted tests its own taps (``twisted/web/test/test_tap.py``):
options parsed from a command line, ``makeService`` called, the tree
looked at, then started and stopped on a memory reactor that writes down
the ports it is asked to listen on.  The state store, the response cache
and the connection pool are made by recording builders, to see them close.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from oproxy.cache import MemoryStore, ResponseCache
from oproxy.config import CacheConfig, StateConfig
from oproxy.console.parts import ConsoleService
from oproxy.health import ProbeService
from oproxy.logs import AccessLogService
from oproxy.metrics import MULTIPROCESS_ENV
from oproxy.routing.breaker import CircuitSync
from oproxy.service import ProcessService, ProxyService, Refusal
from oproxy.serving import SignalService
from oproxy.site import ProxySite
from oproxy.state.sqlite import SQLiteStore
from oproxy.tap import BUILDERS, Builders, ConnectionPool, Options, makeService, refusal_for
from oproxy.watch import ConfigWatcher
from oproxy.workers import WorkerPool


class RecordingStore(SQLiteStore):
    """The embedded store, noting when it closes."""

    def __init__(self, path: str, journal: list[str]) -> None:
        super().__init__(path)
        self.journal = journal

    def close(self) -> defer.Deferred[None]:
        self.journal.append("store closed")
        return super().close()


class RecordingCache(ResponseCache):
    def __init__(self, reactor: Any, journal: list[str]) -> None:
        super().__init__(MemoryStore(reactor, 1 << 20), reactor)
        self.journal = journal

    async def close(self) -> None:
        self.journal.append("cache closed")
        await super().close()


class RecordingPool(ConnectionPool):
    def __init__(self, reactor: Any, journal: list[str]) -> None:
        super().__init__(reactor)
        self.journal = journal

    def closeCachedConnections(self) -> Any:
        self.journal.append("pool closed")
        return super().closeCachedConnections()


def recording(journal: list[str]) -> Builders:
    return dataclasses.replace(
        BUILDERS,
        store=lambda config, reactor: RecordingStore(str(config.path), journal),
        cache=lambda config, reactor: RecordingCache(reactor, journal),
        pool=lambda reactor: RecordingPool(reactor, journal),
    )


def options(tmp_path: Path, workers: int, listen: str = "tcp:8123:interface=127.0.0.1") -> Options:
    config = tmp_path / "oproxy.yaml"
    config.write_text(
        f"""
listen: ["{listen}"]
workers: {workers}
backends: [{{name: local, url: "http://127.0.0.1:11434"}}]
state: {{path: '{tmp_path / "state.db"}'}}
access_log: {{path: '{tmp_path / "access.log"}'}}
"""
    )
    parsed = Options()
    parsed.parseOptions(["--config", str(config)])
    return parsed


def children(top: service.IService) -> list[type]:
    return [type(child) for child in top]  # type: ignore[attr-defined]


def nothing_done(reactor: MemoryReactorClock, tmp_path: Path) -> None:
    """No port bound, no file made, no timer, trigger or signal handler."""
    assert reactor.tcpServers == [] and reactor.unixServers == []
    assert reactor.getDelayedCalls() == []
    assert reactor.triggers == {} and reactor.whenRunningHooks == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oproxy.yaml"]


def stop(reactor: MemoryReactorClock, top: service.IService) -> None:
    stopping = defer.maybeDeferred(top.stopService)
    for _ in range(200):
        if stopping.called:
            break
        reactor.advance(0.5)
    assert stopping.called, "the tree never stopped"
    failures: list[Failure] = []
    stopping.addErrback(failures.append)
    assert not failures


@pytest.fixture
def sighup_kept() -> Iterator[Any]:
    """The test process's SIGHUP handler, as it was before the test."""
    before = signal.getsignal(signal.SIGHUP)
    yield before
    signal.signal(signal.SIGHUP, before)


def test_one_process_builds_without_io_binds_at_start_and_closes_in_order(
    tmp_path: Path, sighup_kept: Any
) -> None:
    journal: list[str] = []
    reactor = MemoryReactorClock()
    top = makeService(options(tmp_path, workers=1), reactor, recording(journal))

    assert isinstance(top, ProxyService)
    assert children(top) == [
        SignalService,
        ConfigWatcher,
        ProbeService,
        CircuitSync,
        ConsoleService,
        AccessLogService,
    ]
    assert top.site is None
    nothing_done(reactor, tmp_path)
    assert signal.getsignal(signal.SIGHUP) is sighup_kept

    top.privilegedStartService()
    [(port, site, _, interface)] = reactor.tcpServers
    assert (port, interface) == (8123, "127.0.0.1")
    assert isinstance(site, ProxySite) and site is top.site
    assert not (tmp_path / "state.db").exists(), "the store opens at start, unprivileged"

    top.startService()
    assert (tmp_path / "state.db").exists() and (tmp_path / "access.log").exists()
    assert signal.getsignal(signal.SIGHUP) is not sighup_kept
    assert journal == []

    stop(reactor, top)
    assert journal == ["cache closed", "store closed", "pool closed"]
    assert signal.getsignal(signal.SIGHUP) is sighup_kept
    assert top.ports == []
    assert reactor.triggers == {}, "no reactor trigger of ours, at any time"


class ThreadedMemoryReactor(MemoryReactorClock):
    """A memory reactor that takes calls from signal handlers."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)


def test_a_reload_hands_the_replaced_cache_to_the_tree(tmp_path: Path, sighup_kept: Any) -> None:
    journal: list[str] = []
    reactor = ThreadedMemoryReactor()
    parsed = options(tmp_path, workers=1)
    top = makeService(parsed, reactor, recording(journal))
    assert isinstance(top, ProxyService)
    top.privilegedStartService()
    top.startService()
    config = Path(parsed["config"])
    config.write_text(config.read_text() + "cache: {max_bytes: 1MiB}\n")
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(10):
        reactor.advance(0)
        if journal:
            break
    # The old cache is closed at once, the new one at the stop.
    assert journal == ["cache closed"]
    stop(reactor, top)
    assert journal == ["cache closed", "cache closed", "store closed", "pool closed"]


class Process:
    """A worker process that ends when it is told to stop."""

    def __init__(self, pid: int, protocol: Any, env: dict[str, str], fds: dict[int, Any]) -> None:
        self.pid = pid
        self.proto = protocol
        self.env = env
        self.fds = fds
        protocol.ready = True

    def signalProcess(self, signum: int) -> None:
        self.proto.processEnded(Failure(ProcessTerminated(signal=signum)))


class SpawningReactor(MemoryReactorClock):
    """A memory reactor whose processes are only written down."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[Process] = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: Any, env: Any, childFDs: Any = None, **kw: Any
    ) -> Process:
        process = Process(1000 + len(self.processes), protocol, env, childFDs)
        self.processes.append(process)
        return process


def test_a_master_builds_without_io_binds_at_start_and_cleans_up_at_stop(
    tmp_path: Path, sighup_kept: Any
) -> None:
    reactor = SpawningReactor()
    top = makeService(options(tmp_path, workers=2, listen="tcp:0:interface=127.0.0.1"), reactor)

    assert isinstance(top, ProcessService) and not isinstance(top, ProxyService)
    assert children(top) == [WorkerPool, SignalService, ConfigWatcher, AccessLogService]
    [pool] = [child for child in top if isinstance(child, WorkerPool)]  # type: ignore[attr-defined]
    assert pool.listeners == () and pool.metrics_directory is None
    nothing_done(reactor, tmp_path)

    top.privilegedStartService()
    [listener] = pool.listeners
    assert len(listener.sockets) == 2, "one socket per worker"
    port = listener.sockets[0].getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # bound and listening
    assert reactor.processes == [] and pool.metrics_directory is None

    top.startService()
    directory = pool.metrics_directory
    assert directory is not None and os.path.isdir(directory)
    assert [p.env[MULTIPROCESS_ENV] for p in reactor.processes] == [directory, directory]
    assert [p.fds[3] for p in reactor.processes] == [s.fileno() for s in listener.sockets]

    stop(reactor, top)
    assert not os.path.exists(directory)
    assert all(s.fileno() == -1 for s in listener.sockets)
    assert signal.getsignal(signal.SIGHUP) is sighup_kept
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert reactor.triggers == {}


def test_a_dsn_without_the_sdk_stops_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def without_sentry(name: str, *args: Any) -> Any:
        return None if name == "sentry_sdk" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_sentry)
    parsed = options(tmp_path, workers=1)
    assert parsed.config is not None
    parsed.config = evolve(
        parsed.config, sentry=evolve(parsed.config.sentry, dsn="https://k@sentry.invalid/1")
    )
    reactor = MemoryReactorClock()
    with pytest.raises(SystemExit) as stopped:
        makeService(parsed, reactor)
    assert "sentry-sdk is not installed" in str(stopped.value)
    nothing_done(reactor, tmp_path)


def test_the_default_builders_make_what_the_configuration_names() -> None:
    reactor = MemoryReactorClock()
    store = BUILDERS.store(StateConfig(path="/nonexistent/never-made.db"), reactor)
    assert isinstance(store, SQLiteStore) and not os.path.exists("/nonexistent")
    assert isinstance(BUILDERS.cache(CacheConfig(), reactor), ResponseCache)
    assert isinstance(BUILDERS.pool(reactor), ConnectionPool)


def test_how_a_daemon_that_cannot_bind_stops_follows_twistd() -> None:
    parsed = Options()
    assert refusal_for(parsed) == Refusal(foreground=True, pidfile=None)
    parsed.parent = {"nodaemon": True, "pidfile": "twistd.pid"}
    assert refusal_for(parsed) == Refusal(foreground=True, pidfile="twistd.pid")
    parsed.parent = {"nodaemon": True, "pidfile": ""}
    assert refusal_for(parsed) == Refusal(foreground=True, pidfile=None)
    parsed.parent = {"nodaemon": False, "pidfile": "twistd.pid"}
    assert refusal_for(parsed) == Refusal(foreground=False)


def test_nothing_in_the_package_adds_a_reactor_trigger_of_its_own() -> None:
    """``twistd`` stops the tree in its trigger; one of ours would run beside it."""
    package = Path(__file__).parent.parent / "oproxy"
    adding = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if "addSystemEventTrigger" in path.read_text(encoding="utf-8")
    ]
    assert adding == []
