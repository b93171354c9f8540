"""
The clock-driven pacing of a generation that a client may abandon at any
point: one step a tick, then the end, or an abort as soon as the client
goes away.

Everything is scheduled on an injected :class:`IReactorTime`, never on
wall time, so a :class:`twisted.internet.task.Clock` can drive a whole
stream token by token in a unit test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request


class Pacer:
    """
    Runs ``steps`` one per ``delay`` seconds on ``clock`` (all at once when
    ``delay`` is 0), then ``finish``; stops for good after ``stall_after``
    steps, leaving the client waiting (0: not even a first byte); stops at
    once when the client goes.

    The Deferred :meth:`start` returns fires with what ``finish`` returns
    (a body for Klein to write, or ``None`` when the steps wrote it all).
    Klein cancels it when the connection is lost; the request's
    ``notifyFinish`` errback is watched too, so an abort is noticed
    whichever comes first.
    """

    def __init__(
        self,
        clock: IReactorTime,
        delay: float,
        steps: Sequence[Callable[[], None]],
        finish: Callable[[], bytes | None],
        on_abort: Callable[[], None],
        *,
        stall_after: int | None = None,
    ) -> None:
        self._clock = clock
        self._delay = delay
        self._steps = steps
        self._finish = finish
        self._on_abort = on_abort
        self._stall_after = stall_after
        self._index = 0
        self._started = 0.0
        self._call: IDelayedCall | None = None
        self._over = False
        self._request: Request | None = None
        self.deferred: Deferred[bytes | None] = Deferred(lambda _: self.abort())

    def start(self, request: Request, *, load_delay: float = 0.0) -> Deferred[bytes | None]:
        """
        Begin after ``load_delay`` seconds, a model's load.  Pacing counts
        from the end of the load, as a model's runner only starts then.
        """
        self._request = request
        request.notifyFinish().addErrback(self._lost)
        self._started = self._clock.seconds() + load_delay
        if self._stall_after == 0:
            return self.deferred  # until the client gives up
        if load_delay > 0:
            self._call = self._clock.callLater(load_delay, self._loaded)
        else:
            self._advance()
        return self.deferred

    @property
    def pending(self) -> bool:
        """
        Whether a tick is scheduled.
        """
        return self._call is not None and self._call.active()

    def _lost(self, failure: Failure) -> None:
        self.abort()

    def _advance(self) -> None:
        while not self._over:
            if self._stall_after is not None and self._index >= self._stall_after:
                return  # until the client gives up
            if self._index >= len(self._steps):
                self._over = True
                self.deferred.callback(self._finish())
                return
            if self._delay > 0:
                # Due times are counted from the start, not from the last
                # tick, so pacing does not drift and ``Clock.advance(total)``
                # runs every tick that falls within ``total``.
                due = self._started + self._delay * (self._index + 1)
                wait = max(0.0, due - self._clock.seconds())
                self._call = self._clock.callLater(wait, self._tick)
                return
            self._run_step()

    def _run_step(self) -> None:
        step = self._steps[self._index]
        self._index += 1
        step()

    def _loaded(self) -> None:
        self._call = None
        self._advance()

    def _tick(self) -> None:
        self._call = None
        if not self._over:
            self._run_step()
            self._advance()

    def abort(self) -> None:
        """
        Stop: cancel the pending tick and report the abort, once.  Does
        nothing after the run has finished.
        """
        if self._over:
            return
        self._over = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._on_abort()

    def abandon(self) -> None:
        """
        Stop as a server that goes away does: the run counts as aborted
        and the client's connection is closed.
        """
        self.abort()
        if self._request is not None:
            self._request.loseConnection()  # type: ignore[no-untyped-call]
