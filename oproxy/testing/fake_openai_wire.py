"""
How the fake OpenAI server puts answers on the wire: JSON and event-stream
framing, what it has seen (:class:`FakeOpenAIStats`), and the clock-driven
pacing of a generation that a client may abandon at any point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request

from oproxy.testing.fake_openai_requests import APIError
from oproxy.testing.fake_stream import respond, write

JSON_TYPE: Final = b"application/json"
SSE_TYPE: Final = b"text/event-stream; charset=utf-8"
DONE: Final = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------
# Framing


def json_response(request: Request, status: int, value: Any) -> bytes:
    """A JSON answer with an explicit length."""
    return respond(request, status, JSON_TYPE, orjson.dumps(value))


def error_response(request: Request, error: APIError) -> bytes:
    """OpenAI's error object, with the error's headers (``retry-after``)."""
    for name, value in error.headers.items():
        request.responseHeaders.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
    return json_response(request, error.status, error.body())


def start_events(request: Request) -> None:
    """Prepare a 200 event stream; the headers leave with the first event."""
    request.setResponseCode(200)
    request.responseHeaders.setRawHeaders(b"content-type", [SSE_TYPE])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])


def event(value: Any) -> bytes:
    """One ``data:`` event: OpenAI sends no ``event:`` or ``id:`` lines."""
    return b"data: " + orjson.dumps(value) + b"\n\n"


def write_events(request: Request, values: Sequence[Any]) -> None:
    """Write each value as its own event, one ``write`` each."""
    for value in values:
        write(request, event(value))


# --------------------------------------------------------------------------
# What the fake has seen


@dataclass(frozen=True)
class SeenRequest:
    """
    One request as it arrived: what a proxy actually sent upstream.

    :ivar headers: lower-case names, several values joined with ``, ``.
    :ivar body: the decoded JSON body, or ``None``.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "body": self.body,
        }


@dataclass
class FakeOpenAIStats:
    """
    Counters and the request log, for tests to assert on.

    :ivar started: generations (chat and completions) that began.
    :ivar completed: generations that ended normally.
    :ivar aborted: generations stopped because the client went away.
    :ivar aborted_streams: those of them that were streams.
    :ivar failed: generations that ended in an error (``broken``).
    :ivar requests: every request but the fake's own ``/_fake/*``.
    """

    started: int = 0
    completed: int = 0
    aborted: int = 0
    aborted_streams: int = 0
    failed: int = 0
    requests: list[SeenRequest] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return self.started - self.completed - self.aborted - self.failed

    @property
    def last_request(self) -> SeenRequest | None:
        return self.requests[-1] if self.requests else None

    def counters(self) -> dict[str, Any]:
        """What ``GET /_fake/stats`` serves."""
        last = self.last_request
        return {
            "requests": len(self.requests),
            "started": self.started,
            "completed": self.completed,
            "aborted": self.aborted,
            "aborted_streams": self.aborted_streams,
            "failed": self.failed,
            "in_flight": self.in_flight,
            "last_request": last.to_json() if last is not None else None,
        }

    def reset(self, in_flight: int = 0) -> None:
        """Zero everything, counting generations still running as started."""
        self.started, self.completed, self.failed = in_flight, 0, 0
        self.aborted = self.aborted_streams = 0
        self.requests.clear()


# --------------------------------------------------------------------------
# Pacing


class Pacer:
    """
    Runs ``steps`` one per ``delay`` seconds on ``clock`` (all at once when
    ``delay`` is 0), then ``finish``; stops for good after ``stall_after``
    steps, leaving the client waiting; stops at once when the client goes.

    The Deferred :meth:`start` returns fires with what ``finish`` returns
    (a body for Klein to write, or ``None`` when everything was written).
    Klein cancels it when the connection is lost; ``notifyFinish`` is
    watched too, so an abort is noticed whichever comes first.
    """

    def __init__(
        self,
        clock: IReactorTime,
        delay: float,
        steps: Sequence[Callable[[], None]],
        finish: Callable[[], bytes | None],
        on_abort: Callable[[], None],
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
        self.deferred: Deferred[bytes | None] = Deferred(lambda _: self.abort())

    def start(self, request: Request) -> Deferred[bytes | None]:
        request.notifyFinish().addErrback(self._lost)
        self._started = self._clock.seconds()
        self._advance()
        return self.deferred

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
                # Due times count from the start, so pacing does not drift.
                due = self._started + self._delay * (self._index + 1)
                self._call = self._clock.callLater(
                    max(0.0, due - self._clock.seconds()), self._tick
                )
                return
            self._run_step()

    def _run_step(self) -> None:
        step = self._steps[self._index]
        self._index += 1
        step()

    def _tick(self) -> None:
        self._call = None
        if not self._over:
            self._run_step()
            self._advance()

    @property
    def pending(self) -> bool:
        """Whether a tick is scheduled."""
        return self._call is not None and self._call.active()

    def abort(self) -> None:
        """Stop and report the abort, once; nothing after the run ended."""
        if self._over:
            return
        self._over = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._on_abort()
