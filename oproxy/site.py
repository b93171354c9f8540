"""
The HTTP site: connections, request heads and bodies, each within bounds.

Twisted's HTTP server trusts its clients more than a gateway on a network
can: its idle timer restarts on every byte, so a client that sends one
header line every few seconds holds its connection (and a descriptor)
forever; it buffers a body of any announced size, and reads all of it
before the resource may refuse it; and it sends ``Unknown Status`` for
statuses it has no phrase for (429 among them).  This module bounds all of
that:

* a connection past a cap (:mod:`oproxy.connections`) is closed at once,
  before an HTTP channel is built for it;
* a request's head must arrive within ``limits.head_timeout`` seconds of
  its first byte (of the connection's start, for the first request), and
  its body within ``limits.body_timeout`` of the end of its head: time to
  complete, not time between bytes.  Past that the client gets ``408`` and
  the connection is closed.  Between requests the idle timeout
  (:data:`IDLE_TIMEOUT`) applies, and while a request is being answered
  (a stream may last many minutes) neither does;
* a body larger than ``limits.max_body_bytes`` gets ``413`` as soon as that
  is known (from ``Content-Length``, or when a chunked body grows past it),
  without waiting for it;
* every status goes out with its standard reason phrase;
* a path with repeated slashes (``//v1//models``) is served as its
  normalised self, so no redirect built from the client's ``Host`` header
  is ever sent.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from twisted.internet import defer, interfaces
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from oproxy.config import RequestLimits
from oproxy.connections import ConnectionLimits, client_of
from oproxy.errors import OProxyError, RequestTimeout, RequestTooLarge
from oproxy.metrics import Metrics
from oproxy.web.dialects import dialect_for_path

#: Seconds a kept-alive connection may sit idle between requests.  Longer
#: than any client keeps an idle connection (httpx: 5 s, browsers: about a
#: minute), so the server is not the one that closes a connection a client
#: is about to reuse.
IDLE_TIMEOUT = 120.0

#: Seconds the rest of a refused request is read and dropped after the
#: answer (``408``, ``413``), so that a client still sending reads the
#: answer instead of a connection reset; then the connection is cut.
LINGER_SECONDS = 5.0

HEAD = "head"
BODY = "body"

_REPEATED_SLASHES = re.compile(rb"//+")

#: What Twisted's own factory wraps each channel in (looked up once: the
#: module's attributes go through a deprecation proxy).
_ChannelWrapper: Any = http._GenericHTTPChannelProtocol  # type: ignore[attr-defined]

_STATUS_CLASSES = {
    1: b"Informational",
    2: b"Success",
    3: b"Redirection",
    4: b"Client Error",
    5: b"Server Error",
}


def _reason_phrases() -> dict[int, bytes]:
    phrases = dict(http.RESPONSES)
    phrases.update((status.value, status.phrase.encode("ascii")) for status in HTTPStatus)
    # nginx's, which Ollama answers when a client gives up on a queued request.
    phrases[499] = b"Client Closed Request"
    return phrases


_PHRASES = _reason_phrases()


def reason_phrase(code: int) -> bytes:
    """The standard reason phrase for ``code`` (its class's name if it has none)."""
    phrase = _PHRASES.get(code)
    if phrase is None:
        phrase = _STATUS_CLASSES.get(code // 100, b"Unknown Status")
    return phrase


def _discard(*args: Any) -> None:
    """Input of a refused request: read, and dropped."""


class _Refused(Protocol):
    """
    A connection over a cap: closed as soon as it exists.

    Returning ``None`` from ``buildProtocol`` would be cheaper still for a
    plain TCP port, but a TLS wrapper cannot take ``None`` for an answer.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class ProxyChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection whose request heads and bodies have deadlines.

    One timer per connection serves both deadlines: a phase that starts
    only moves a mark (a number), and the timer, when it fires, either
    finds the mark passed, finds it later and waits again, or finds no
    phase under way and stops.  A busy kept-alive connection thus makes no
    timer per request.
    """

    site: ProxySite
    #: The bucket this connection is counted in (:func:`client_of`).
    client = "unix"
    #: Set once an answer was sent without the request being served.
    refused = False
    _phase: str | None = None
    _phase_seconds = 0.0
    _phase_ends = 0.0
    _timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self._begin(HEAD)

    def dataReceived(self, data: bytes) -> None:
        if self._phase is None and not self._handlingRequest:
            # The first byte of the next request on a kept-alive connection.
            self._begin(HEAD)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def allHeadersReceived(self) -> None:
        self._phase = None
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        if not self.refused and self.length != 0:
            self._begin(BODY)

    def allContentReceived(self) -> None:
        if self.refused:
            # A chunked body that grew past the cap, then ended.
            return
        self._phase = None
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Any) -> None:
        # Twisted leaves the bytes after a body in the buffer, often b"".
        if self.persistent and any(self._dataBuffer):
            # A pipelined request began while this one was answered.
            self._begin(HEAD)
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def _send100Continue(self) -> None:
        if not self.refused:
            super()._send100Continue()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._phase = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        try:
            super().connectionLost(reason)  # type: ignore[no-untyped-call]
        finally:
            self.site.connection_closed(self)

    # -- deadlines -----------------------------------------------------------

    def _begin(self, phase: str) -> None:
        limits = self.site.request_limits()
        seconds = limits.head_timeout if phase == HEAD else limits.body_timeout
        self._phase = phase
        self._phase_seconds = seconds
        self._phase_ends = self.site.reactor.seconds() + seconds
        timer = self._timer
        if timer is None:
            self._timer = self.site.reactor.callLater(seconds, self._deadline)
        elif timer.getTime() > self._phase_ends:
            timer.reset(seconds)

    def _deadline(self) -> None:
        self._timer = None
        if self._phase is None or self.refused:
            return
        left = self._phase_ends - self.site.reactor.seconds()
        if left > 0:
            self._timer = self.site.reactor.callLater(left, self._deadline)
            return
        phase = self._phase
        self.site.metrics.request_read_timeouts.labels(phase).inc()
        self.refuse(
            RequestTimeout(
                f"The request {phase} was not received within {self._phase_seconds:g} seconds."
            )
        )

    # -- answering without serving ---------------------------------------------

    def refuse_oversized(self, limit: int) -> None:
        """``413`` for a body over ``limit`` bytes, at once."""
        error = RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        self.site.metrics.rejections.labels(error.code or error.error_type).inc()
        self.refuse(error)

    def refuse(self, error: OProxyError) -> None:
        """
        Answer ``error`` now, for the request being read, and close.

        Whatever else the client sends is read and dropped for up to
        :data:`LINGER_SECONDS`, after the write side is closed: a client
        still busy sending its body then reads the answer (and the end of
        the connection) rather than a reset.
        """
        if self.refused:
            return
        self.refused = True
        self._phase = None
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        self.dataReceived = self.lineReceived = self.rawDataReceived = _discard  # type: ignore[method-assign, assignment]
        # Written as the route would: Ollama's shape on its native routes.
        dialect = dialect_for_path(getattr(self, "_path", b""))
        status, body = dialect.status_and_body(error)
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (status, reason_phrase(status), dialect.content_type, len(body), body)
        )
        network: Any = self._networkProducer
        network.unregisterProducer()
        half_closes = interfaces.ISSLTransport(transport, None) is None and hasattr(
            transport, "loseWriteConnection"
        )
        if not half_closes:
            transport.loseConnection()
            return
        transport.loseWriteConnection()
        self._abortingCall = self.site.reactor.callLater(LINGER_SECONDS, self._cut)

    def _cut(self) -> None:
        self._abortingCall = None
        transport: Any = self.transport
        transport.abortConnection()


class BoundedRequest(server.Request):
    """A request whose body is kept only up to ``max_body_bytes``."""

    channel: ProxyChannel
    max_body_bytes: int = 32 * 1024 * 1024
    body_too_large = False
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            length = 0
            self.channel.refuse_oversized(self.max_body_bytes)
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body_bytes:
            self.body_too_large = True
            self.content = io.BytesIO()
            self.channel.refuse_oversized(self.max_body_bytes)
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        super().setResponseCode(  # type: ignore[no-untyped-call]
            code, reason_phrase(code) if message is None else message
        )

    def process(self) -> None:
        # Routing would answer a redirect to the merged path, an absolute
        # URL built from the client's Host header; serve it instead.
        if b"//" in self.path:
            self.path = _REPEATED_SLASHES.sub(b"/", self.path)
        hsts = self.channel.site.hsts
        if hsts is not None and self.isSecure():  # type: ignore[no-untyped-call]
            self.setHeader(b"strict-transport-security", hsts)  # type: ignore[no-untyped-call]
        super().process()  # type: ignore[no-untyped-call]


class ProxySite(server.Site):
    """
    A Site whose connections and requests are bounded by the current
    configuration's limits, and which knows how many requests are in
    flight, so that a stopping process can let them finish.

    :param limits: the limits in force now (a reload swaps them).
    :param descriptors: this process's descriptor limit, which may lower
        the connection cap (``None``: unlimited).
    """

    def __init__(
        self,
        resource: IResource,
        limits: Callable[[], RequestLimits],
        *,
        metrics: Metrics,
        descriptors: int | None = None,
        **kw: Any,
    ) -> None:
        # The API takes JSON: parsing every POST's Content-Type for HTML form
        # fields (with the email package) costs a tenth of a request's time.
        kw.setdefault("parsePOSTFormSubmission", False)
        kw.setdefault("timeout", IDLE_TIMEOUT)
        super().__init__(resource, **kw)  # type: ignore[no-untyped-call]
        self.request_limits = limits
        self.metrics = metrics
        self.connection_limits = ConnectionLimits(limits, self.reactor, metrics, descriptors)
        self.requestFactory = self._make_request  # type: ignore[assignment]
        #: Where each request's access line (Twisted's combined log format)
        #: goes; ``None``: nowhere.
        self.request_lines: Callable[[str], None] | None = None
        #: ``Strict-Transport-Security`` for answers over TLS (``None``: not sent).
        self.hsts: bytes | None = None
        self.in_flight = 0
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._connections: dict[ProxyChannel, defer.Deferred[None]] = {}

    def protocol(self) -> Any:  # type: ignore[override]
        # What Twisted's own factory builds, around a channel with deadlines.
        return _ChannelWrapper(ProxyChannel())  # type: ignore[no-untyped-call]

    def buildProtocol(self, addr: Any) -> Any:
        client = client_of(addr)
        if not self.connection_limits.admit(client):
            return _Refused()
        wrapper = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        channel: ProxyChannel = wrapper._channel
        channel.client = client
        self._connections[channel] = defer.Deferred()
        return wrapper

    def connection_closed(self, channel: ProxyChannel) -> None:
        """An admitted connection is gone: its slot is free again."""
        closed = self._connections.pop(channel, None)
        if closed is None:
            return
        self.connection_limits.release(channel.client)
        closed.callback(None)

    def stopFactory(self) -> None:
        self.connection_limits.refusals.stop()
        super().stopFactory()  # type: ignore[no-untyped-call]

    def close_connections(self) -> defer.Deferred[Any]:
        """
        Close every client connection once its buffered output is written.

        A finished response may still sit in the socket's write buffer; a
        reactor that stops without this would cut its tail off.
        """
        closing = list(self._connections.values())
        for channel in list(self._connections):
            if channel.transport is not None:
                channel.transport.loseConnection()
        return defer.gatherResults(closing)

    def abort_connections(self) -> None:
        """
        Cut every client connection now, as the drain deadline does to
        requests still running: their handlers are cancelled (which stops
        the upstream's generation) and settle what they used.
        """
        for channel in list(self._connections):
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()

    def _make_request(self, channel: ProxyChannel, *args: Any, **kw: Any) -> BoundedRequest:
        request = BoundedRequest(channel, *args, **kw)  # type: ignore[no-untyped-call]
        request.max_body_bytes = self.request_limits().max_body_bytes
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
