"""
``twistd oproxy``: the command line and the composition root.

Only this module (and its twin for worker processes, :mod:`oproxy.worker`)
touches the global reactor, reads files and builds connection pools;
everything below receives what it needs.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from oproxy import __version__
from oproxy.after_send import AfterSend
from oproxy.announce import log_backends
from oproxy.app import ProxyApp
from oproxy.backends.base import IBackend
from oproxy.backends.ollama import OllamaBackend
from oproxy.backends.openai import OpenAIBackend
from oproxy.cache import ResponseCache, build_cache
from oproxy.config import Config, ConfigError, load_config, with_overrides
from oproxy.connections import descriptor_limit, raise_descriptor_limit
from oproxy.health import BackendHealth, ProbeService
from oproxy.http11 import IdleConnections, LeanAgent
from oproxy.images.fetch import Images
from oproxy.listeners import bind
from oproxy.logs import AccessLog, AccessLogService, Rotator
from oproxy.metrics import MULTIPROCESS_ENV, Metrics, metrics_for_this_process
from oproxy.reload import Reloader
from oproxy.reporting import start_reporting, stop_reporting
from oproxy.routing.breaker import CircuitSync
from oproxy.routing.router import Router, RoutingState
from oproxy.security.guard import Guard
from oproxy.serving import ServingService, SignalService, freeze_startup_heap
from oproxy.site import ProxySite
from oproxy.state.opening import open_store
from oproxy.upstream import ReusedEndpoints, Upstream
from oproxy.watch import ConfigWatcher
from oproxy.workers import WorkerPool, WorkerSpec

#: Listening sockets handed to workers start at this descriptor number.
FIRST_INHERITED_FD = 3


def load_configuration(
    path: str | None, listen: Sequence[str] = (), backend_url: str | None = None
) -> Config:
    """
    Read and validate the file (or the embedded defaults) plus overrides.

    :raises ConfigError: the configuration is not valid.
    :raises OSError: the file cannot be read.
    """
    text = None
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    return with_overrides(load_config(text, os.environ), listen=listen, backend_url=backend_url)


class Options(usage.Options):
    """``twistd oproxy [--config FILE] [--listen ENDPOINT]... [--backend URL]``."""

    optParameters = [
        ["config", "c", None, "YAML configuration file (default: embedded defaults)."],
        ["backend", "b", None, "URL of an Ollama server; replaces the configured backends."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self.config: Config | None = None
        self._failed = False

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted endpoint to serve on (repeatable), e.g. tcp:8000:interface=127.0.0.1."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"oproxy {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self.config = load_configuration(self["config"], self["listen"], self["backend"])
        except OSError as e:
            self._failed = True
            raise usage.UsageError(f"cannot read config file: {e}") from None
        except ConfigError as e:
            self._failed = True
            where = f" in {self['config']}" if self["config"] else ""
            raise usage.UsageError(f"invalid configuration{where}: {e}") from None

    def getUsage(self, width: int | None = None) -> str:
        # twistd prints the whole help before a usage error; for a bad
        # config file the one line that says what is wrong is what matters.
        if self._failed:
            return "Usage: twistd [options] oproxy [--config FILE] (see --help)\n"
        usage_text: str = super().getUsage(width)  # type: ignore[no-untyped-call]
        return usage_text


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory, without a log line for every upstream
    connection opened and closed.
    """

    noisy = False


class ConnectionPool(HTTPConnectionPool):
    """
    Twisted's pool for ``Agent`` (HTTPS backends), and the idle
    connections of the lean client that calls plain-HTTP backends.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.lean = IdleConnections(limit_per_origin=64)

    def closeCachedConnections(self) -> Any:
        self.lean.close()
        return super().closeCachedConnections()  # type: ignore[no-untyped-call]


def connection_pool(reactor: Any) -> ConnectionPool:
    """
    The one set of persistent upstream connections the whole process shares.
    """
    pool = ConnectionPool(reactor)
    pool.maxPersistentPerHost = 64
    pool.retryAutomatically = False
    pool._factory = _QuietClientFactory  # type: ignore[attr-defined]
    return pool


def build_router(
    config: Config, reactor: Any, pool: ConnectionPool, state: RoutingState | None = None
) -> Router:
    """
    One upstream client per backend, over the shared pool.

    :param state: what routing learnt so far (circuits, model lists, load),
        handed on by a reload; backends the new config dropped are forgotten.
    """
    clock: IReactorTime = reactor
    backends: list[IBackend] = []
    for backend_config in config.backends:
        endpoints = ReusedEndpoints(reactor, backend_config.timeouts.connect)
        agent = LeanAgent(
            endpoints, Agent.usingEndpointFactory(reactor, endpoints, pool=pool), pool.lean
        )
        if backend_config.type == "openai":
            backends.append(
                OpenAIBackend(backend_config, agent, clock, api_key=backend_config.api_key)
            )
        else:
            backends.append(OllamaBackend(Upstream(backend_config, agent, clock)))
    if state is None:
        state = RoutingState.new(clock, config.routing)
    state.catalog.forget(b.name for b in backends)
    return Router(backends, config.routing, state)


def build_response_cache(config: Config, reactor: Any) -> ResponseCache:
    """The response cache; a Redis client is closed when the reactor stops."""
    cache, redis = build_cache(config.cache, reactor)
    if redis is not None:
        reactor.addSystemEventTrigger("before", "shutdown", redis.close)
    return cache


def build_app(
    config: Config,
    reactor: Any,
    pool: ConnectionPool,
    access_log: AccessLog | None = None,
    after_send: AfterSend | None = None,
) -> ProxyApp:
    """Wire the app over the shared pool."""
    metrics = metrics_for_this_process()
    guard = build_guard(config, reactor, metrics)
    # Circuits are shared with the other workers through the same store.
    routing = RoutingState.new(reactor, config.routing, store=guard.store, metrics=metrics)
    return ProxyApp(
        config,
        build_router(config, reactor, pool, routing),
        clock=reactor,
        images=Images(reactor),
        cache=build_response_cache(config, reactor),
        metrics=metrics,
        guard=guard,
        access_log=access_log,
        after_send=after_send,
    )


def build_guard(config: Config, reactor: Any, metrics: Metrics) -> Guard:
    """
    Keys, limits and quotas over the configured state store.

    The store is opened here (a SQLite file is created on first use) and
    closed when the reactor stops.  Changing ``state:`` needs a restart.
    """
    guard = Guard(open_store(config.state, reactor), reactor, metrics, config.state)
    guard.start()
    reactor.addSystemEventTrigger("before", "shutdown", guard.stop)
    return guard


_access = Logger(namespace="oproxy.access")


def log_request_line(line: str) -> None:
    """An access line as an event in this process's log."""
    _access.info("{line}", line=line)


def build_site(app: ProxyApp, request_lines: Callable[[str], None] = log_request_line) -> ProxySite:
    """
    The site over the app: connections, request heads and bodies bounded
    by the current configuration's ``limits`` (:mod:`oproxy.site`).
    """
    site = ProxySite(
        app.resource(),
        lambda: app.config.limits,
        metrics=app.metrics,
        descriptors=descriptor_limit(),
        reactor=app.clock,
    )
    site.displayTracebacks = False
    site.noisy = False

    def after_the_answer(line: str) -> None:
        app.after_send(request_lines, line)

    # With the JSON access log, an access line would say it twice.
    site.request_lines = after_the_answer if app.access_log is None else None
    return site


def serve_here(
    reactor: Any,
    options_config: tuple[str | None, Sequence[str], str | None],
    config: Config,
    listen: Any,
    rotate_access_log: bool = True,
    watch_config: bool = True,
    request_lines: Callable[[str], None] = log_request_line,
    *,
    announce_listeners: bool = True,
    announce_backends: bool = True,
) -> service.MultiService:
    """
    The serving side, for a single process or a worker: the app, its site on
    the listeners ``listen(site)`` returns, graceful drain, ``SIGHUP``
    reloads, reloads when the file changes (unless a master watches it), and
    the access log (rotated here unless a master does it).

    :param announce_listeners: log what each listener serves, and where
        (unless a master did).
    :param announce_backends: log how each backend answered the first probe
        (in one worker only).
    """
    pool = connection_pool(reactor)
    access_log = AccessLog(config.access_log.path) if config.access_log else None
    after_send = AfterSend(reactor)
    # Requests finished as the reactor stops are still counted and logged.
    reactor.addSystemEventTrigger("after", "shutdown", after_send.run)
    app = build_app(config, reactor, pool, access_log, after_send)
    site = build_site(app, request_lines)
    path, overrides, backend_url = options_config
    reloader = Reloader(
        app,
        lambda: load_configuration(path, overrides, backend_url),
        lambda new: build_router(new, reactor, pool, app.router.state),
        lambda new: build_response_cache(new, reactor),
        source=path,
    )
    top = service.MultiService()
    top.addService(
        ServingService(
            reactor,
            app,
            site,
            listen(site),
            lambda: app.config.drain_timeout,
            descriptions=config.listen if announce_listeners else None,
        )
    )
    top.addService(SignalService(reactor, signal.SIGHUP, reloader.reload))
    if watch_config:
        add_config_watcher(top, path, config, reactor, reloader.reload)

    def first_probe(found: list[BackendHealth]) -> None:
        log_backends(app.config.backends, found, app.router.state.catalog)

    top.addService(
        ProbeService(app, reactor, first_round=first_probe if announce_backends else None)
    )
    top.addService(CircuitSync(app.router.state.breaker, reactor))
    if config.access_log is not None:
        rotator = Rotator(config.access_log, reactor) if rotate_access_log else None
        top.addService(AccessLogService(reactor, access_log, rotator))
    reactor.callWhenRunning(freeze_startup_heap)
    return top


def add_config_watcher(
    top: service.MultiService,
    path: str | None,
    config: Config,
    reactor: Any,
    reload: Callable[[], object],
) -> None:
    """
    Reload through ``reload`` (what ``SIGHUP`` runs) when the ``--config``
    file changes, unless there is no file or ``reload.watch`` is off.
    """
    if path and config.reload.watch:
        top.addService(ConfigWatcher(path, reload, reactor, config.reload.interval))


def report_errors(reactor: Any, config: Config) -> None:
    """Send unhandled errors to Sentry when a DSN is configured."""
    try:
        observer = start_reporting(config.sentry)
    except RuntimeError as e:
        raise SystemExit(f"oproxy: {e}") from None
    if observer is not None:
        reactor.addSystemEventTrigger("after", "shutdown", stop_reporting, observer)


def _listen_now(reactor: Any, description: str, factory: Any) -> IListeningPort:
    results: list[Any] = []
    endpoints.serverFromString(reactor, description).listen(factory).addBoth(results.append)
    if not results or not IListeningPort.providedBy(results[0]):
        if results:
            results[0].raiseException()
        raise CannotListenError(None, description, "did not bind")
    port: IListeningPort = results[0]
    return port


def logs_plainly_to_stdout(options: usage.Options) -> bool:
    """
    Whether ``twistd`` writes its log as plain lines on standard output.

    That is how systemd runs the daemon (``--nodaemon --logfile=-``, into
    the journal) and how it runs in a terminal.  Workers can then write
    their lines there themselves, in the same format, instead of sending
    each one through the master: with a line per request, relaying cost the
    master a fifth of a core at 3,000 requests/s and grows with workers.
    A log file (which ``twistd`` rotates), syslog or a custom ``--logger``
    keeps the relay.
    """
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return False
    to_stdout = twistd.get("logfile") == "-" or (
        twistd.get("nodaemon") and not twistd.get("logfile")
    )
    return bool(to_stdout and not twistd.get("syslog") and not twistd.get("logger"))


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.config
    assert config is not None
    origin = (options["config"], tuple(options["listen"]), options["backend"])
    workers = config.workers or os.cpu_count() or 1
    report_errors(reactor, config)
    # Before any worker starts: they inherit it.
    raise_descriptor_limit()
    try:
        if workers == 1:
            return serve_here(
                reactor,
                origin,
                config,
                lambda site: [_listen_now(reactor, d, site) for d in config.listen],
            )
        listeners = [bind(reactor, description, workers) for description in config.listen]
    except CannotListenError as e:
        raise SystemExit(f"oproxy: cannot listen on {e.port}: {e.socketError}") from None
    except OSError as e:
        raise SystemExit(f"oproxy: cannot listen: {e}") from None
    spec = WorkerSpec(
        config_path=origin[0],
        listen=origin[1],
        backend_url=origin[2],
        listeners=tuple((FIRST_INHERITED_FD + i, d) for i, d in enumerate(config.listen)),
        log_fd=FIRST_INHERITED_FD + len(config.listen) if logs_plainly_to_stdout(options) else None,
    )
    top = service.MultiService()
    # A private metrics directory per daemon instance: new at every start, so
    # no sample of an earlier run is ever added in.
    metrics_directory = tempfile.mkdtemp(prefix="oproxy-metrics-")
    pool = WorkerPool(
        reactor,
        workers,
        spec,
        listeners,
        lambda: config.drain_timeout,
        environment={MULTIPROCESS_ENV: metrics_directory},
        metrics_directory=metrics_directory,
    )
    top.addService(pool)
    top.addService(SignalService(reactor, signal.SIGHUP, pool.reload))
    # One watcher, here: the workers are told the way SIGHUP tells them.
    add_config_watcher(top, origin[0], config, reactor, pool.reload)
    if config.access_log is not None:
        # Workers write; only the master rotates.
        top.addService(AccessLogService(reactor, None, Rotator(config.access_log, reactor)))
    return top
