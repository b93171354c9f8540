"""
The skeleton both fakes are built on: a Klein route table whose handlers
may raise the fake's own error type, a root resource that may refuse a
request before routing, a queue of injected failures, the generations
running now, and the ``/_fake/stats`` and ``/_fake/reset`` routes.

A fake brings its wire format: how it encodes JSON, renders its errors and
answers an unknown path or method.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from oproxy.testing.base.stats import ServerStats

ErrorT = TypeVar("ErrorT", bound=Exception)

Handler = Callable[..., "bytes | Deferred[bytes | None]"]
Route = tuple[str, list[str], Handler]
"""A path (Klein's syntax), its methods and what answers it."""


@dataclass(frozen=True)
class InjectedFailure:
    """
    One failure queued by ``fail_next``: the next inference request gets
    ``status`` before any byte.
    """

    status: int
    message: str | None
    retry_after: float | None = None


class Running(Protocol):
    """
    A generation under way, as the server tracks it.
    """

    @property
    def pending(self) -> bool:
        """Whether a tick is scheduled."""

    def abandon(self) -> None:
        """Stop it and close its client's connection."""


class FakeRoot(Resource):
    """
    A fake's root resource: drops Twisted's ``Server`` header (the real
    servers send none), lets the fake refuse the request (a ``Host`` check,
    a key), then routes with Klein.
    """

    isLeaf = True

    def __init__(self, fake: FakeServer[Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._fake = fake
        self._routes = fake.app.resource()

    def render(self, request: IRequest) -> bytes | int:
        req = cast(Request, request)
        req.responseHeaders.removeHeader(b"server")
        refusal = self._fake.before_routing(req)
        if refusal is not None:
            return refusal
        return cast(int, self._routes.render(request))  # always NOT_DONE_YET


class FakeServer(Generic[ErrorT]):
    """
    An in-process fake server.

    :param clock: where all time comes from (the reactor, or a
        :class:`~twisted.internet.task.Clock` in unit tests).
    :param token_delay: seconds between streamed tokens for every model.

    :ivar app: the Klein route table.
    :ivar stats: counters and the request log.
    """

    #: What handlers raise to answer with an error (see :meth:`render_error`).
    error_type: ClassVar[type[Exception]]

    def __init__(self, clock: IReactorTime, *, token_delay: float, stats: ServerStats[Any]) -> None:
        self.clock = clock
        self.token_delay = token_delay
        self.stats = stats
        self._failures: deque[InjectedFailure] = deque()
        self._running: set[Running] = set()
        self.app = Klein()
        own: list[Route] = [
            ("/_fake/stats", ["GET"], self._fake_stats),
            ("/_fake/reset", ["POST"], self._fake_reset),
        ]
        for path, methods, handler in [*self.routes(), *own]:
            self.app.route(path, methods=methods, endpoint=path)(self._guarded(handler))
        self.app.handle_errors(NotFound)(self._not_found)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)

    # ------------------------------------------------------------------
    # What a fake defines

    def routes(self) -> list[Route]:
        """The fake's routes (``/_fake/stats`` and ``/_fake/reset`` are added)."""
        raise NotImplementedError

    def before_routing(self, request: Request) -> bytes | None:
        """A body to answer with instead of routing the request, or ``None``."""
        return None

    def render_error(self, request: Request, error: ErrorT) -> bytes:
        """The answer for an error a handler raised."""
        raise NotImplementedError

    def json_response(self, request: Request, status: int, value: Any) -> bytes:
        """A JSON answer in the fake's encoding."""
        raise NotImplementedError

    def not_found(self, request: Request) -> bytes:
        """The answer for a path no route matches."""
        raise NotImplementedError

    def not_allowed(self, request: Request) -> bytes:
        """The answer for a method the path does not take."""
        raise NotImplementedError

    # ------------------------------------------------------------------
    # Public helpers

    def resource(self) -> IResource:
        """
        The resource to serve, e.g. ``Site(fake.resource())``.
        """
        return FakeRoot(self)

    def reset(self) -> None:
        """
        Counters and request log zeroed, no pending failures.  Running
        generations carry on and are still counted when they end.
        """
        self.stats.reset(in_flight=len(self._running))
        self._failures.clear()

    def pending_timers(self) -> int:
        """
        How many running generations have a tick scheduled (0 once every
        generation has ended or been aborted).
        """
        return sum(1 for run in self._running if run.pending)

    def abandon_all(self) -> None:
        """
        End every running generation as a server going away does (counted
        as aborted, the client's connection closed), so that the counters
        are final.
        """
        for run in list(self._running):
            run.abandon()

    # ------------------------------------------------------------------
    # For the fake's handlers

    def _queue_failure(self, failure: InjectedFailure, times: int = 1) -> None:
        for _ in range(times):
            self._failures.append(failure)

    def _take_failure(self) -> InjectedFailure | None:
        """The next queued failure, if any (each serves one request)."""
        return self._failures.popleft() if self._failures else None

    # ------------------------------------------------------------------
    # Routing

    def _guarded(self, handler: Handler) -> Handler:
        def endpoint(request: Request, **arguments: str) -> bytes | Deferred[bytes | None]:
            try:
                return handler(request, **arguments)
            except self.error_type as error:
                return self.render_error(request, cast(ErrorT, error))

        return endpoint

    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self.not_found(cast(Request, request))

    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return self.not_allowed(cast(Request, request))

    def _fake_stats(self, request: Request) -> bytes:
        return self.json_response(request, 200, self.stats.counters())

    def _fake_reset(self, request: Request) -> bytes:
        self.reset()
        return self.json_response(request, 200, {})
