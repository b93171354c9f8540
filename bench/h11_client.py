"""
The lean HTTP/1.1 client with h11 reading the answers, for measuring only.

``oproxy/http11.py`` parses answers by hand.  This module keeps its pooling,
flow control and failure types and hands the framing to h11 (a maintained,
I/O-free HTTP/1.1 parser), so that ``bench/client_cpu.py`` can weigh the
two in the same run::

    python bench/client_cpu.py --client h11=bench/h11_client.py \\
        --client h11-stand-in=bench/h11_client.py#StandInLeanAgent

``LeanAgent`` lets h11 write the request too; ``StandInLeanAgent`` writes
it by hand, as ``oproxy/http11.py`` does, and tells h11 only that a
request with that method went out: the cheapest use of h11 there is.
Measured against the hand parser it cost about twice the CPU per call
either way, which is why the package does not use it.
"""

from __future__ import annotations

from typing import Any

import h11
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from oproxy.http11 import (
    MAX_HEAD_BYTES,
    BadResponse,
    IdleConnections,
    LeanResponse,
    _BodyTransport,
    _OneConnection,
    _OriginConnections,
)
from oproxy.http11 import LeanAgent as HandParsedLeanAgent

__all__ = ["IdleConnections", "LeanAgent", "StandInLeanAgent"]

_NO_BODY_STATUSES = frozenset({204, 304})
_CONNECTION_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
)
_END = h11.EndOfMessage()


class _H11Connection(Protocol):
    """One kept-alive connection, one request at a time, framed by h11."""

    stand_ins: dict[bytes, h11.Request] | None = None  # set: write requests by hand

    def __init__(self, idle: _OriginConnections) -> None:
        self._idle = idle
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._answer: defer.Deferred[LeanResponse] | None = None
        self._in_body = False
        self._body: Any = None
        self._early: list[bytes] = []
        self._ended: Failure | None = None
        self._method = b""
        self._until_close = False
        self._aborted = False
        self.lost = False

    @property
    def usable(self) -> bool:
        return not self.lost and not self._aborted

    def send(
        self, method: bytes, target: bytes, headers: Headers, body: bytes | None
    ) -> defer.Deferred[LeanResponse]:
        self._method = method
        if self.stand_ins is None:
            fields = [(n, v) for n, values in headers.getAllRawHeaders() for v in values]
            if body is not None:
                fields.append((b"Content-Length", b"%d" % len(body)))
            data = self._h11.send(h11.Request(method=method, target=target, headers=fields))
            if body:
                data += self._h11.send(h11.Data(data=body))
            data += self._h11.send(_END)
        else:
            lines = [method + b" " + target + b" HTTP/1.1"]
            for name, values in headers.getAllRawHeaders():
                lines.extend(name + b": " + value for value in values)
            if body is not None:
                lines.append(b"Content-Length: %d" % len(body))
            data = b"\r\n".join([*lines, b"", b""]) + (body or b"")
            stand_in = self.stand_ins.get(method)
            if stand_in is None:
                stand_in = self.stand_ins[method] = h11.Request(
                    method=method, target=b"/", headers=[(b"Host", b"-")]
                )
            self._h11.send(stand_in)
            self._h11.send(_END)
        assert self.transport is not None
        self.transport.write(data)
        self._answer = defer.Deferred(self._cancel_answer)
        return self._answer

    def _cancel_answer(self, _: object) -> None:
        self._answer = None
        self.abort()

    def abort(self) -> None:
        self._idle.discard(self)  # type: ignore[arg-type]
        if self.transport is not None and not self.lost and not self._aborted:
            self._aborted = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._answer is None and not self._in_body:
            self.abort()
            return
        self._h11.receive_data(data)
        self._read_events()

    def _read_events(self) -> None:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                self._fail(BadResponse(str(e)))
                return
            if isinstance(event, h11.Data):
                self._deliver(event.data)
            elif isinstance(event, h11.Response):
                self._respond(event)
            elif isinstance(event, h11.EndOfMessage):
                self._end_body()
                return
            elif not isinstance(event, h11.InformationalResponse):
                return  # NEED_DATA, PAUSED, ConnectionClosed

    def _respond(self, event: h11.Response) -> None:
        headers = Headers()
        length: int | object = UNKNOWN_LENGTH
        framed = False
        for name, value in event.headers.raw_items():
            lower = name.lower()
            if lower in _CONNECTION_HEADERS:
                if lower == b"content-length":
                    length = int(value)
                framed = framed or lower in (b"content-length", b"transfer-encoding")
                continue
            headers.addRawHeader(name, value)
        if self._method == b"HEAD" or event.status_code in _NO_BODY_STATUSES:
            length, framed = 0, True
        self._until_close = not framed
        answer, self._answer = self._answer, None
        self._in_body = True
        assert answer is not None
        answer.callback(LeanResponse(self, event.status_code, event.reason, headers, length))  # type: ignore[arg-type]

    def deliver_to(self, protocol: Any) -> None:
        self._body = protocol
        protocol.makeConnection(_BodyTransport(self))  # type: ignore[arg-type]
        early, self._early = self._early, []
        for data in early:
            protocol.dataReceived(data)
        ended, self._ended = self._ended, None
        if ended is not None:
            self._body = None
            protocol.connectionLost(ended)

    def _deliver(self, data: bytes) -> None:
        if self._body is None:
            self._early.append(data)
        else:
            self._body.dataReceived(data)

    def _end_body(self) -> None:
        if self._h11.trailing_data[0]:
            self._fail(BadResponse("the server sent more than its answer"))
            return
        self._in_body = False
        reason = Failure(http.PotentialDataLoss() if self._until_close else ResponseDone())
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._idle.put(self)  # type: ignore[arg-type]
        else:
            self.abort()
        self._finish(reason)

    def _finish(self, reason: Failure) -> None:
        body, self._body = self._body, None
        if body is None:
            self._ended = reason
        else:
            body.connectionLost(reason)

    def _fail(self, error: Exception) -> None:
        self.abort()
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.errback(ResponseNeverReceived([Failure(error)]))
        elif self._in_body:
            self._in_body = False
            self._finish(Failure(ResponseFailed([Failure(error)])))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.lost = True
        self._idle.discard(self)  # type: ignore[arg-type]
        if self._answer is not None:
            answer, self._answer = self._answer, None
            answer.errback(ResponseNeverReceived([reason]))
        elif self._in_body:
            if self._until_close and not self._aborted:
                self._h11.receive_data(b"")
                self._read_events()
            if self._in_body:
                self._in_body = False
                self._finish(Failure(ResponseFailed([reason])))


class _StandInConnection(_H11Connection):
    stand_ins: dict[bytes, h11.Request] | None = {}


class LeanAgent(HandParsedLeanAgent):
    """:class:`oproxy.http11.LeanAgent` over :class:`_H11Connection`."""

    connection_class: type[_H11Connection] = _H11Connection

    async def _send(
        self, origin: bytes, method: bytes, target: bytes, headers: Headers, body: bytes | None
    ) -> IResponse:
        idle = self._idle.of(origin)
        connection: Any = idle.take()
        if connection is None:
            endpoint = self._endpoints.endpointForURI(URI.fromBytes(b"http://" + origin + b"/"))
            made = self.connection_class(idle)
            connection = await endpoint.connect(_OneConnection(made))  # type: ignore[arg-type]
        response: IResponse = await connection.send(method, target, headers, body)
        return response


class StandInLeanAgent(LeanAgent):
    """The request written by hand; h11 reads the answer only."""

    connection_class = _StandInConnection
