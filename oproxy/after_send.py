"""
Work that must not delay the answers the reactor is about to send.

Twisted does not send what a protocol writes at once: it queues the bytes
and sends them on its next pass over the sockets, which comes after the
timed calls due now.  Everything a request does after its answer is
written -- its access line, its metrics, its JSON log record -- would run
before that pass and hold the answer back.  :class:`AfterSend` runs such work
one reactor turn later: scheduled from a timed call, a call waits until the
next round of timed calls, which follows the pass that sends the answer.
nginx keeps its access log out of the way in the same manner (a log phase
after the response).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


def call_after_send(clock: IReactorTime, function: Callable[..., object], *args: Any) -> None:
    """Call ``function(*args)`` once the reactor has sent what is written now."""
    clock.callLater(0, clock.callLater, 0, function, *args)


class AfterSend:
    """
    Call functions once the reactor has sent what is written now.

    Calls made in one reactor turn share one pair of timed calls.  The owner
    calls :meth:`run` when the reactor shuts down, so that no log line is
    lost on a stop.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._pending: list[Callable[[], object]] = []

    def __call__(self, function: Callable[..., object], *args: Any) -> None:
        if not self._pending:
            call_after_send(self._reactor, self.run)
        self._pending.append(partial(function, *args))

    @property
    def waiting(self) -> int:
        """How many calls wait."""
        return len(self._pending)

    def run(self) -> None:
        """Do the waiting work now, in the order it was asked for."""
        pending, self._pending = self._pending, []
        for work in pending:
            try:
                work()
            except Exception:
                log.failure("Work done after an answer was sent failed")
