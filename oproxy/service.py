"""
The service tree: one owner for every long-lived resource of a process.

``makeService`` (:mod:`oproxy.tap`) only builds; the tree opens and closes,
in an order that lets every request end first:

* ``privilegedStartService`` binds the listeners (before ``twistd`` drops
  ``--uid``/``--gid`` privileges, so low ports work); a worker adopts the
  sockets its master bound instead.
* ``startService`` starts error reporting, opens the state store and the
  access log, then starts the background loops (probes, circuit sync,
  config watch, access-log rotation, ``SIGHUP``).
* ``stopService`` stops accepting, drains the requests and streams in
  flight, stops the loops, runs the work left for after the answers (counts,
  access lines, plugins' completion hooks), stops the plugins that are
  services (a webhook delivers its queue, through the pool), waits until
  every request's usage is settled in the store, and only then closes the
  response cache, the state store and the upstream connection pool, in that
  order, waiting for each; error reporting stops last.

``twistd`` stops the tree in a ``before shutdown`` trigger of its own and
waits for the Deferred :meth:`ProxyService.stopService` returns, so nothing
here registers a reactor trigger.  Whatever long-lived thing is added later
joins this tree.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from oproxy.after_send import AfterSend
from oproxy.announce import log_listeners
from oproxy.cache import ResponseCache
from oproxy.logs import AccessLog
from oproxy.security.guard import Guard
from oproxy.serving import drain, freeze_startup_heap
from oproxy.site import ProxySite

log = Logger()

T = TypeVar("T")


class CannotServe(Exception):
    """
    A listener cannot be bound: the daemon says so in one line and stops.

    See :class:`Refusal` for how the process stops.
    """


def bound(bind: Callable[[], T]) -> T:
    """
    ``bind()``, with a port in use (or any socket error) as :class:`CannotServe`.
    """
    try:
        return bind()
    except CannotListenError as e:
        raise CannotServe(f"oproxy: cannot listen on {e.port}: {e.socketError}") from None
    except OSError as e:
        raise CannotServe(f"oproxy: cannot listen: {e}") from None


@dataclass(frozen=True)
class Refusal:
    """
    How a process that cannot serve stops, saying why in one line.

    ``twistd`` has made ``sys.stderr`` a log file by now; the person who
    started the daemon reads the terminal's, so the line goes there, as it
    would have before anything started.  A detached daemon has no terminal:
    the reason is raised to ``twistd``, which tells the parent it forked
    from, which prints it and exits with status 1 (a ``SystemExit`` there
    would leave that parent waiting for ever).

    :ivar foreground: ``twistd -n``, a worker, or no ``twistd`` at all.
    :ivar pidfile: the pid file ``twistd`` wrote, removed on the way out
        (``twistd`` removes it itself when the process is detached).
    """

    foreground: bool = True
    pidfile: str | None = None

    def __call__(self, reason: CannotServe) -> NoReturn:
        if not self.foreground:
            raise reason
        if self.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(self.pidfile)
        print(reason, file=sys.__stderr__)
        raise SystemExit(1)


#: A process in the foreground, without a pid file: workers, and tests.
FOREGROUND = Refusal()


class Pool(Protocol):
    """The upstream connection pool, as the tree sees it: something to close."""

    def closeCachedConnections(self) -> Any: ...


@dataclass(frozen=True)
class Resources:
    """
    What a serving process opens and closes, besides its listeners.

    :ivar guard: keys and limits; its store is opened by :meth:`Guard.start`
        and closed by :meth:`Guard.close`.
    :ivar cache: the live response cache (a reload may have replaced the
        one the process started with).
    :ivar pool: the upstream connections every backend shares.
    :ivar after_send: the work left for after each answer is sent.
    :ivar access_log: the JSON access log, when one is configured.
    :ivar draining: tells the request handling that the process stops, so
        that answers close their connections.
    :ivar plugins: the plugins' own services (a webhook's sender), started
        with the resources and stopped once the last answers are counted
        (their completion hooks have run), before the connections close.
    """

    guard: Guard
    cache: Callable[[], ResponseCache]
    pool: Pool
    after_send: AfterSend
    access_log: AccessLog | None
    draining: Callable[[], None]
    plugins: service.IService | None = None


class ProcessService(service.MultiService):
    """
    The top of one process's tree: error reporting first to start and last
    to stop, and a process that cannot bind stops with one line.

    :param reporting: the Sentry reporting service, when a DSN is set.
    :param refusal: how the process stops when it cannot bind.
    :param prepare: done first, before binding: raising the descriptor
        limit, which the site sizes itself by and workers inherit.
    """

    def __init__(
        self,
        *,
        reporting: service.IService | None = None,
        refusal: Refusal = FOREGROUND,
        prepare: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.reporting = reporting
        self.refusal = refusal
        self._prepare = prepare
        if reporting is not None:
            self.addService(reporting)

    def addService(self, child: service.IService) -> None:
        super().addService(child)  # type: ignore[no-untyped-call]

    def privilegedStartService(self) -> None:
        if self._prepare is not None:
            self._prepare()
        try:
            self.bind()
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotServe as reason:
            self.refusal(reason)

    def bind(self) -> None:
        """Bind what this process serves on (with privileges, if it had any)."""

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        if self.reporting is not None:
            self.reporting.startService()
        self.open()
        for child in self._others():
            child.startService()

    def open(self) -> None:
        """Open the process's resources, before its other services start."""

    def _others(self) -> Iterator[service.IService]:
        return (child for child in self if child is not self.reporting)

    async def stop_children(self) -> None:
        """Stop every service but reporting, the last started first, together."""
        stopping = [
            defer.maybeDeferred(child.stopService) for child in reversed(list(self._others()))
        ]
        await defer.DeferredList(stopping)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await self.close()
        finally:
            if self.reporting is not None:
                await step("Stopping error reporting", self.reporting.stopService)

    async def close(self) -> None:
        """Stop the process's services and close its resources, in order."""
        await self.stop_children()


async def step(what: str, action: Callable[[], object]) -> None:
    """
    Run one step of a stop, waiting for it; a failure is logged, not raised,
    so that the steps after it (closing the rest) still run.
    """
    try:
        result = action()
        if isinstance(result, Awaitable):
            await result
    except Exception:
        log.failure("{what} failed", what=what)


class ProxyService(ProcessService):
    """
    A serving process: a single process, or a worker.

    :param make_site: builds the site to serve; called when binding, after
        ``prepare`` has raised the descriptor limit it sizes itself by.
    :param bind: puts a site on the process's listeners: binds them, or (in
        a worker) adopts the sockets its master bound.
    :param drain_timeout: the current ``drain_timeout`` (a reload may change it).
    :param descriptions: the endpoint strings bound; given, the process says
        at start what each serves, and where.
    """

    def __init__(
        self,
        reactor: Any,
        resources: Resources,
        *,
        make_site: Callable[[], ProxySite],
        bind: Callable[[ProxySite], list[IListeningPort]],
        drain_timeout: Callable[[], float],
        descriptions: Sequence[str] | None = None,
        reporting: service.IService | None = None,
        refusal: Refusal = FOREGROUND,
        prepare: Callable[[], object] | None = None,
    ) -> None:
        super().__init__(reporting=reporting, refusal=refusal, prepare=prepare)
        self.reactor = reactor
        self.resources = resources
        self._make_site = make_site
        self._bind = bind
        self._drain_timeout = drain_timeout
        self._descriptions = descriptions
        #: The site, once bound.
        self.site: ProxySite | None = None
        self.ports: list[IListeningPort] = []
        #: Caches a reload replaced, being closed.
        self._retired: set[defer.Deferred[None]] = set()

    def bind(self) -> None:
        site = self._make_site()
        self.ports = bound(lambda: self._bind(site))
        self.site = site

    def open(self) -> None:
        if self.resources.access_log is not None:
            self.resources.access_log.open()
        self.resources.guard.start()
        if self.resources.plugins is not None:
            self.resources.plugins.startService()
        if self._descriptions is not None:
            hosts = [port.getHost() for port in self.ports]
            log_listeners(zip(self._descriptions, hosts, strict=True))
        self.reactor.callWhenRunning(freeze_startup_heap)

    def retire_cache(self, cache: ResponseCache) -> None:
        """
        Close a cache a reload replaced, once the streams it is storing are
        stored; a stop waits for it.  Requests still using it see a closed
        store: a miss.
        """
        closing = defer.Deferred.fromCoroutine(cache.close())
        closing.addErrback(lambda failure: log.failure("Closing the old cache", failure))
        if not closing.called:
            self._retired.add(closing)
            closing.addBoth(lambda _: self._retired.discard(closing))

    async def close(self) -> None:
        resources = self.resources
        resources.draining()
        ports, self.ports = self.ports, []
        site = self.site
        if site is not None:
            await step("Draining", lambda: drain(self.reactor, site, ports, self._drain_timeout()))
        await step("Stopping the background services", self.stop_children)
        await step("Counting and logging the last answers", resources.after_send.run)
        if resources.plugins is not None:
            await step("Stopping the plugins", resources.plugins.stopService)
        await step("Settling the last requests", resources.guard.stop)
        await step("Closing the replaced caches", self._retired_closed)
        await step("Closing the response cache", lambda: resources.cache().close())
        await step("Closing the state store", resources.guard.close)
        await step("Closing the upstream connections", resources.pool.closeCachedConnections)
        if resources.access_log is not None:
            await step("Closing the access log", resources.access_log.close)

    async def _retired_closed(self) -> None:
        while self._retired:
            await defer.DeferredList(list(self._retired))
