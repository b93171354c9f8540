"""
``twistd oproxy``: the command line and the composition root.

Only this module (and its twin for worker processes, :mod:`oproxy.worker`)
wires things together; everything below receives what it needs.  It builds
and does no I/O: the service tree it returns (:mod:`oproxy.service`) binds,
opens and closes, when ``twistd`` starts and stops it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.application import service
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
from oproxy.backends.kinds import build_backend
from oproxy.cache import ResponseCache, build_cache
from oproxy.certs.tls import server_endpoint
from oproxy.certs.wiring import (
    certificate_report,
    certificate_services,
    hsts_header,
    serving_listen,
)
from oproxy.config import CacheConfig, Config, ConfigError, StateConfig, load_config, with_overrides
from oproxy.connections import descriptor_limit, raise_descriptor_limit
from oproxy.console.parts import (
    ConfigSource,
    ConsoleService,
    build_console,
    defaults_only,
    reload_here,
    reload_through_master,
)
from oproxy.health import BackendHealth, ProbeService
from oproxy.http11 import IdleConnections, LeanAgent
from oproxy.images.fetch import Images
from oproxy.listeners import Listener, bind
from oproxy.logs import AccessLog, AccessLogService, Rotator
from oproxy.metrics import Metrics, metrics_for_this_process
from oproxy.plugins.host import PluginHost
from oproxy.plugins.interface import Environment
from oproxy.reload import Reloader
from oproxy.reporting import ReportingService, check_reporting
from oproxy.routing.breaker import CircuitSync
from oproxy.routing.router import Router, RoutingState
from oproxy.security.guard import Guard
from oproxy.service import FOREGROUND, ProcessService, ProxyService, Refusal, Resources
from oproxy.serving import SignalService
from oproxy.site import ProxySite
from oproxy.state.base import IStateStore
from oproxy.state.opening import open_store
from oproxy.upstream import ReusedEndpoints
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
        backends.append(build_backend(backend_config, agent, clock))
    if state is None:
        state = RoutingState.new(clock, config.routing)
    state.catalog.forget(b.name for b in backends)
    return Router(backends, config.routing, state)


def response_cache(config: CacheConfig, reactor: Any) -> ResponseCache:
    """The response cache; closing it closes its Redis client, if it has one."""
    cache, _ = build_cache(config, reactor)
    return cache


@dataclass(frozen=True)
class Builders:
    """
    How the composition root makes what the service tree owns and closes.

    Each builds without I/O (a store or a cache connects on first use); tests
    give their own to see what is opened and closed, and in which order.

    :ivar store: the state store a ``state:`` section names.
    :ivar cache: the response cache a ``cache:`` section asks for.
    :ivar pool: the upstream connection pool.
    :ivar bind: binds one listener for a master's workers.
    """

    store: Callable[[StateConfig, Any], IStateStore] = open_store
    cache: Callable[[CacheConfig, Any], ResponseCache] = response_cache
    pool: Callable[[Any], ConnectionPool] = connection_pool
    bind: Callable[[Any, str, int], Listener] = bind


BUILDERS = Builders()


def build_app(
    config: Config,
    reactor: Any,
    pool: ConnectionPool,
    access_log: AccessLog | None = None,
    after_send: AfterSend | None = None,
    builders: Builders = BUILDERS,
    config_source: ConfigSource | None = None,
) -> ProxyApp:
    """
    Wire the app over the shared pool.  Nothing is opened: the guard's
    store opens when :meth:`Guard.start` runs (the service tree does that),
    and the plugins that are services start with the tree.

    :param config_source: the file the console's editor shows and writes
        (by default none: the editor is read-only).
    :raises ConfigError: a configured plugin cannot be built.
    """
    metrics = metrics_for_this_process()
    plugins = build_plugins(config, reactor, pool, metrics)
    certificates = certificate_report(config)
    if certificates is not None:
        metrics.add_collector(certificates)
    guard = build_guard(config, reactor, metrics, builders)
    console = build_console(
        config,
        reactor,
        metrics,
        access_log_path=access_log.path if access_log is not None else None,
        source=config_source or defaults_only(),
    )
    # Circuits are shared with the other workers through the same store.
    routing = RoutingState.new(reactor, config.routing, store=guard.store, metrics=metrics)
    return ProxyApp(
        config,
        build_router(config, reactor, pool, routing),
        clock=reactor,
        images=Images(reactor),
        cache=builders.cache(config.cache, reactor),
        metrics=metrics,
        guard=guard,
        access_log=access_log,
        after_send=after_send,
        certificates=certificates,
        console=console,
        plugins=plugins,
    )


def build_plugins(
    config: Config, reactor: Any, pool: ConnectionPool, metrics: Metrics
) -> PluginHost:
    """
    The configured plugins, built (not started), with what they may use:
    the clock, a treq client over the shared pool, the metrics.
    """
    http = HTTPClient(Agent(reactor, pool=pool))
    host = PluginHost(Environment(clock=reactor, http=http, metrics=metrics))
    host.commit(host.build(config.plugins))
    return host


def build_guard(
    config: Config, reactor: Any, metrics: Metrics, builders: Builders = BUILDERS
) -> Guard:
    """
    Keys, limits and quotas over the configured state store, not yet
    started.  Changing ``state:`` needs a restart.
    """
    return Guard(builders.store(config.state, reactor), reactor, metrics, config.state)


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
    site.hsts = hsts_header(app.config)

    def after_the_answer(line: str) -> None:
        app.after_send(request_lines, line)

    # With the JSON access log, an access line would say it twice.
    site.request_lines = after_the_answer if app.access_log is None else None
    return site


def serving_service(
    reactor: Any,
    options_config: tuple[str | None, Sequence[str], str | None],
    config: Config,
    listen: Callable[[ProxySite], list[IListeningPort]],
    rotate_access_log: bool = True,
    watch_config: bool = True,
    request_lines: Callable[[str], None] = log_request_line,
    *,
    announce_listeners: bool = True,
    announce_backends: bool = True,
    builders: Builders = BUILDERS,
    refusal: Refusal = FOREGROUND,
    worker: bool = False,
) -> ProxyService:
    """
    The serving side, for a single process or a worker: the app, its site on
    the listeners ``listen(site)`` binds (or adopts), graceful drain,
    ``SIGHUP`` reloads, reloads when the file changes (unless a master
    watches it), and the access log (rotated here unless a master does it).

    Only built: the returned tree binds, opens and closes (:mod:`oproxy.service`).

    :param announce_listeners: log what each listener serves, and where
        (unless a master did).
    :param announce_backends: log how each backend answered the first probe
        (in one worker only).
    :param worker: a worker of a master: the console's editor has the
        master reload every worker, rather than reloading this one.
    """
    pool = builders.pool(reactor)
    access_log = AccessLog(config.access_log.path) if config.access_log else None
    after_send = AfterSend(reactor)
    path, overrides, backend_url = options_config

    def load_text(text: str) -> Config:
        return with_overrides(
            load_config(text, os.environ), listen=overrides, backend_url=backend_url
        )

    source = ConfigSource(
        path,
        load_text,
        reload_through_master(reactor, lambda: app.config)
        if worker
        else reload_here(lambda: reloader.reload()),
    )
    try:
        app = build_app(config, reactor, pool, access_log, after_send, builders, source)
    except ConfigError as e:
        raise SystemExit(f"oproxy: invalid configuration: {e}") from None

    def draining() -> None:
        app.draining = True

    def make_site() -> ProxySite:
        return build_site(app, request_lines)

    top = ProxyService(
        reactor,
        Resources(
            guard=app.guard,
            cache=lambda: app.cache,
            pool=pool,
            after_send=after_send,
            access_log=access_log,
            draining=draining,
            plugins=app.plugins,
        ),
        make_site=make_site,
        bind=listen,
        drain_timeout=lambda: app.config.drain_timeout,
        descriptions=serving_listen(config) if announce_listeners else None,
        reporting=reporting_service(config),
        refusal=refusal,
        prepare=raise_descriptor_limit,
    )
    reloader = Reloader(
        app,
        lambda: load_configuration(path, overrides, backend_url),
        lambda new: build_router(new, reactor, pool, app.router.state),
        lambda new: builders.cache(new.cache, reactor),
        retire_cache=top.retire_cache,
        source=path,
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
    if app.services.console is not None:
        top.addService(ConsoleService(app.services.console))
    if config.access_log is not None:
        rotator = Rotator(config.access_log, reactor) if rotate_access_log else None
        top.addService(AccessLogService(reactor, access_log, rotator))
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


def reporting_service(config: Config) -> ReportingService | None:
    """
    Error reporting to Sentry when a DSN is configured, started and stopped
    with the process's tree; a DSN without the SDK stops the daemon now.
    """
    try:
        check_reporting(config.sentry)
    except RuntimeError as e:
        raise SystemExit(f"oproxy: {e}") from None
    return ReportingService(config.sentry) if config.sentry.dsn else None


def _listen_now(reactor: Any, description: str, factory: Any) -> IListeningPort:
    results: list[Any] = []
    server_endpoint(reactor, description).listen(factory).addBoth(results.append)
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


def refusal_for(options: usage.Options) -> Refusal:
    """
    How the daemon stops when it cannot bind, as ``twistd`` runs it: in the
    foreground (``-n``) or detached; without ``twistd`` (tests), in the
    foreground.
    """
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return FOREGROUND
    if not twistd.get("nodaemon"):
        return Refusal(foreground=False)
    return Refusal(foreground=True, pidfile=twistd.get("pidfile") or None)


def makeService(
    options: Options, reactor: Any = None, builders: Builders = BUILDERS
) -> service.IService:
    """
    The daemon's service tree, built without I/O: nothing is bound, opened
    or started until ``twistd`` starts the tree (:mod:`oproxy.service`).

    :param builders: how the resources the tree owns are made (tests).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.config
    assert config is not None
    origin = (options["config"], tuple(options["listen"]), options["backend"])
    workers = config.workers or os.cpu_count() or 1
    refusal = refusal_for(options)
    if workers == 1:
        single = serving_service(
            reactor,
            origin,
            config,
            lambda site: [_listen_now(reactor, d, site) for d in serving_listen(config)],
            builders=builders,
            refusal=refusal,
        )
        add_certificate_services(single, config, reactor)
        return single
    serving = serving_listen(config)
    spec = WorkerSpec(
        config_path=origin[0],
        listen=origin[1],
        backend_url=origin[2],
        listeners=tuple((FIRST_INHERITED_FD + i, d) for i, d in enumerate(serving)),
        log_fd=FIRST_INHERITED_FD + len(serving) if logs_plainly_to_stdout(options) else None,
    )
    top = ProcessService(
        reporting=reporting_service(config),
        refusal=refusal,
        # Before any worker starts: they inherit it.
        prepare=raise_descriptor_limit,
    )
    pool = WorkerPool(reactor, workers, spec, lambda: config.drain_timeout, bind=builders.bind)
    top.addService(pool)
    top.addService(SignalService(reactor, signal.SIGHUP, pool.reload))
    # One watcher, here: the workers are told the way SIGHUP tells them.
    add_config_watcher(top, origin[0], config, reactor, pool.reload)
    if config.access_log is not None:
        # Workers write; only the master rotates.
        top.addService(AccessLogService(reactor, None, Rotator(config.access_log, reactor)))
    # Only the master makes certificates; the workers serve them.
    add_certificate_services(top, config, reactor)
    return top


def add_certificate_services(top: service.MultiService, config: Config, reactor: Any) -> None:
    """
    The renewal of certificates and the plain-HTTP endpoints, in the one
    process that makes certificates (:mod:`oproxy.certs.wiring`).
    """
    for each in certificate_services(
        config, reactor, lambda description, factory: _listen_now(reactor, description, factory)
    ):
        top.addService(each)
