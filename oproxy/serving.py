"""
Serving a site on listeners, and stopping gracefully.

On stop the process stops accepting at once, answers ``Connection: close``
to whatever arrives on open connections, and lets in-flight requests and
streams finish up to the drain deadline; requests still running then are
cut off, so that their handlers end (and settle what they used) before the
process closes what they were using (:mod:`oproxy.service`).
"""

from __future__ import annotations

import contextlib
import gc
import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger

from oproxy.site import ProxySite
from oproxy.upstream import DeadlineExceeded, within

#: How long flushing and closing client connections may take, and how long
#: requests cut off at the drain deadline may take to end.
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


async def drain(
    clock: IReactorTime, site: ProxySite, ports: Sequence[IListeningPort], deadline: float
) -> None:
    """
    Stop listening on ``ports``, then wait up to ``deadline`` seconds for
    the requests in flight on ``site`` to end, then close its connections.

    When the deadline passes, the requests still running are cut off (their
    connections aborted), so that their handlers are cancelled and end
    within :data:`CLOSE_GRACE`; either way, when this returns, every request
    that ended has run its own ending (its settlement among it).
    """
    await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
    if site.in_flight:
        log.info(
            "Draining {count} in-flight request(s) for up to {deadline:g} seconds",
            count=site.in_flight,
            deadline=deadline,
        )
    try:
        await within(site.idle(), deadline, clock)
    except DeadlineExceeded:
        log.warn(
            "Drain deadline passed with {count} request(s) still in flight",
            count=site.in_flight,
        )
        site.abort_connections()
        with contextlib.suppress(DeadlineExceeded):
            await within(site.idle(), CLOSE_GRACE, clock)
    else:
        with contextlib.suppress(DeadlineExceeded):
            await within(site.close_connections(), CLOSE_GRACE, clock)
    # The site counts a request done when its connection is lost, a moment
    # before the request's handler is cancelled (and settles): one turn of
    # the reactor lets that end run before anything is closed under it.
    await task.deferLater(clock, 0, lambda: None)


class SignalService(service.Service):
    """
    Run ``handler`` in the reactor thread when ``signum`` arrives.

    The handler is in place from ``privilegedStartService``, just after the
    listeners are bound: from then on the port accepts connections and a
    supervisor may send the signal (``systemctl reload`` as soon as the
    port answers), and ``SIGHUP``'s default action would end the process
    while the rest of the tree (the state store, the caches) is still
    starting.  Before the reactor runs, the handler's call waits for it.
    """

    def __init__(self, reactor: Any, signum: int, handler: Callable[[], object]) -> None:
        self._reactor = reactor
        self._signum = signum
        self._handler = handler
        self._previous: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._install()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._install()

    def _install(self) -> None:
        if signal.getsignal(self._signum) != self._received:
            self._previous = signal.signal(self._signum, self._received)

    def _received(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self._handler)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
