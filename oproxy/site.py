"""
The HTTP site: a request class that refuses oversized bodies without holding them.

Twisted buffers a request body before the resource sees it; without a cap a
client could fill the disk or memory with one upload.  A :class:`BoundedRequest`
counts what arrives, stops keeping it past the limit, and lets the app answer
413 once the body is done.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.web import http, server
from twisted.web.resource import IResource


class BoundedRequest(server.Request):
    """A request whose body is kept only up to ``max_body_bytes``."""

    max_body_bytes: int = 32 * 1024 * 1024
    body_too_large = False
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body_bytes:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


class ProxySite(server.Site):
    """
    A Site whose requests are bounded by the current configuration's limit,
    and which knows how many requests are in flight, so that a stopping
    process can let them finish.
    """

    def __init__(self, resource: IResource, max_body_bytes: Callable[[], int], **kw: Any) -> None:
        # The API takes JSON: parsing every POST's Content-Type for HTML form
        # fields (with the email package) costs a tenth of a request's time.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)  # type: ignore[no-untyped-call]
        self._max_body_bytes = max_body_bytes
        self.requestFactory = self._make_request  # type: ignore[assignment]
        #: Where each request's access line (Twisted's combined log format)
        #: goes; ``None``: nowhere.
        self.request_lines: Callable[[str], None] | None = None
        self.in_flight = 0
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._connections: dict[Any, defer.Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if channel is None:
            return None
        closed: defer.Deferred[None] = defer.Deferred()
        self._connections[channel] = closed
        lost = channel.connectionLost

        def connectionLost(reason: Any) -> None:
            try:
                lost(reason)
            finally:
                self._connections.pop(channel, None)
                closed.callback(None)

        channel.connectionLost = connectionLost
        return channel

    def close_connections(self) -> defer.Deferred[Any]:
        """
        Close every client connection once its buffered output is written.

        A finished response may still sit in the socket's write buffer; a
        reactor that stops without this would cut its tail off.
        """
        closing = list(self._connections.values())
        for channel in list(self._connections):
            # Twisted wraps each HTTP channel in a protocol-negotiating proxy.
            transport = getattr(getattr(channel, "_channel", channel), "transport", None)
            if transport is not None:
                transport.loseConnection()
        return defer.gatherResults(closing)

    def _make_request(self, channel: http.HTTPChannel, *args: Any, **kw: Any) -> BoundedRequest:
        request = BoundedRequest(channel, *args, **kw)  # type: ignore[no-untyped-call]
        request.max_body_bytes = self._max_body_bytes()
        self.in_flight += 1
        request.notifyFinish().addBoth(self._request_done)
        return request

    def _request_done(self, _: object) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def log(self, request: Any) -> None:
        """
        Hand the request's access line to :attr:`request_lines`.

        Twisted's own ``log`` writes it to a file-like object that turns
        every line into a legacy log message, then a new-style event; on a
        busy worker that costs a tenth of a request.
        """
        if self.request_lines is not None:
            self.request_lines(self._logFormatter(self._logDateTime, request))

    def idle(self) -> defer.Deferred[None]:
        """Fires when no request is in flight (at once if none is)."""
        if self.in_flight == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(waiter)
        return waiter
