"""
Serving a site on listeners, and stopping gracefully.

On stop the process stops accepting at once, answers ``Connection: close``
to whatever arrives on open connections, lets in-flight requests and streams
finish up to the drain deadline, and only then lets the reactor go.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from oproxy.announce import log_listeners
from oproxy.app import ProxyApp
from oproxy.site import ProxySite
from oproxy.upstream import DeadlineExceeded, within

#: How long flushing and closing idle client connections may take.
CLOSE_GRACE = 5.0

log = Logger()


def freeze_startup_heap() -> None:
    """
    Keep the garbage collector away from what the process built to start.

    Modules, routes, schemas, the configuration: tens of thousands of
    objects that live as long as the process, yet every full collection
    walked them all, for about 15 ms each time, a pause in some request's
    answer and a tenth of a busy worker's CPU.  ``gc.freeze`` moves them out
    of every generation; garbage made by requests is collected as before.
    """
    gc.collect()
    gc.freeze()


class ServingService(service.Service):
    """
    Own the listening ports; on stop, close them and drain for
    ``drain_timeout()`` seconds.

    The ports are bound before the service starts (by the composition root),
    so that a port in use stops the daemon with a message instead of leaving
    it running deaf.

    :param descriptions: the endpoint strings ``ports`` were bound from;
        given, the service says on start what each serves and where.
    """

    def __init__(
        self,
        reactor: Any,
        app: ProxyApp,
        site: ProxySite,
        ports: list[IListeningPort],
        drain_timeout: Callable[[], float],
        *,
        descriptions: Sequence[str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._app = app
        self._site = site
        self._ports = ports
        self._drain_timeout = drain_timeout
        self._descriptions = descriptions

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._descriptions is not None:
            hosts = [port.getHost() for port in self._ports]
            log_listeners(zip(self._descriptions, hosts, strict=True))

    async def _drain(self) -> None:
        self._app.draining = True
        ports, self._ports = self._ports, []
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        deadline = self._drain_timeout()
        if self._site.in_flight:
            log.info(
                "Draining {count} in-flight request(s) for up to {deadline:g} seconds",
                count=self._site.in_flight,
                deadline=deadline,
            )
        try:
            await within(self._site.idle(), deadline, self._reactor)
            await within(self._site.close_connections(), CLOSE_GRACE, self._reactor)
        except DeadlineExceeded:
            log.warn(
                "Drain deadline passed with {count} request(s) still in flight",
                count=self._site.in_flight,
            )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return defer.Deferred.fromCoroutine(self._drain())


class SignalService(service.Service):
    """
    Run ``handler`` in the reactor thread when ``signum`` arrives.
    """

    def __init__(self, reactor: Any, signum: int, handler: Callable[[], object]) -> None:
        self._reactor = reactor
        self._signum = signum
        self._handler = handler
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._previous = signal.signal(self._signum, self._received)

    def _received(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._handler)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
