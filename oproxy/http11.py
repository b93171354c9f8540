"""
A lean HTTP/1.1 client for plain-HTTP backends.

Twisted's ``Agent`` costs about 200 µs of CPU per call against a local
server (URL parsing, a Deferred chain per request, a state-machine parser,
pool bookkeeping with a timer per returned connection); a call needs a
quarter of that.  :class:`LeanAgent` speaks HTTP/1.1 over kept-alive
connections to ``http://`` origins and hands anything else (``https://``)
to the ``Agent`` it wraps.  It provides what :mod:`oproxy.upstream` uses
of ``IAgent``: ``request`` returning an ``IResponse`` whose body is
delivered to a protocol that can pause, resume and abort the connection,
and the failure types ``Agent`` raises (``ResponseNeverReceived`` before an
answer, ``ResponseFailed`` or ``PotentialDataLoss`` in its body).

Not supported, since no backend call needs them: request bodies of unknown
length, pipelining, ``100 Continue``, upgrades.  A connection serves one
request at a time and goes back to the idle list only once its answer has
been read whole.
"""

from __future__ import annotations

from collections import deque
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import URI, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

#: The most a status line and headers may take.
MAX_HEAD_BYTES = 64 * 1024

_NO_BODY_STATUSES = frozenset({204, 304})


class BadResponse(Exception):
    """The server's answer is not HTTP/1.1 we can read."""


@implementer(IResponse)
class LeanResponse:
    """An answer's status and headers; its body goes to one protocol."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self,
        connection: _Connection,
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection = connection

    def deliverBody(self, protocol: Any) -> None:
        self._connection.deliver_to(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:  # pragma: no cover
        self.previousResponse = response


class _BodyTransport:
    """What a body protocol sees as its transport: the connection's flow control."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        if self._connection.transport is not None:
            cast(IPushProducer, self._connection.transport).pauseProducing()

    def resumeProducing(self) -> None:
        if self._connection.transport is not None:
            cast(IPushProducer, self._connection.transport).resumeProducing()

    def stopProducing(self) -> None:
        self._connection.abort()


class _Connection(Protocol):
    """One kept-alive connection, one request at a time."""

    def __init__(self, idle: _OriginConnections) -> None:
        self._idle = idle
        self._buffer = bytearray()
        self._answer: defer.Deferred[LeanResponse] | None = None
        self._method = b""
        self._body: Any = None  # the body protocol, once delivered
        self._early: list[bytes] = []  # body bytes before deliverBody
        self._remaining: int | None = None  # Content-Length left
        self._chunked = False
        self._chunk_left = 0
        self._chunk_state = "size"  # size | data | crlf | trailer
        self._until_close = False
        self._in_body = False
        self._finished_body = False
        self._keep_alive = True
        self._aborted = False
        self._lost_reason: Failure | None = None
        self.lost = False

    # -- the request --------------------------------------------------------

    def send(
        self, method: bytes, target: bytes, headers: Headers, body: bytes | None
    ) -> defer.Deferred[LeanResponse]:
        self._method = method
        lines = [method + b" " + target + b" HTTP/1.1"]
        for name, values in headers.getAllRawHeaders():
            lines.extend(name + b": " + value for value in values)
        if body is not None:
            lines.append(b"Content-Length: %d" % len(body))
        lines.append(b"")
        lines.append(b"")
        assert self.transport is not None
        self.transport.write(b"\r\n".join(lines) + (body or b""))
        self._answer = defer.Deferred(self._cancel_answer)
        return self._answer

    def _cancel_answer(self, _: object) -> None:
        self._answer = None  # the Deferred fails with CancelledError itself
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self._aborted = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- the answer ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._in_body:
            self._body_data(data)
            return
        if self._answer is None:
            self.abort()  # bytes nobody asked for: the connection is not usable
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._fail_answer(BadResponse("the answer's head is too large"))
            return
        head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 4 :])
        self._buffer = bytearray()
        try:
            response = self._parse_head(head)
        except (BadResponse, ValueError) as e:
            self._fail_answer(e if isinstance(e, BadResponse) else BadResponse(str(e)))
            return
        if 100 <= response.code < 200:
            # An interim answer (103 Early Hints, say): the real one follows.
            self._reset()
            if rest:
                self.dataReceived(rest)
            return
        answer, self._answer = self._answer, None
        self._in_body = True
        if self._remaining == 0 and not self._chunked and not self._until_close:
            self._finished_body = True
        assert answer is not None
        answer.callback(response)
        if rest:
            self._body_data(rest)
        elif self._finished_body:
            self._end_body()

    def _parse_head(self, head: bytes) -> LeanResponse:
        status, *header_lines = head.split(b"\r\n")
        version, _, remainder = status.partition(b" ")
        code_text, _, phrase = remainder.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code_text) != 3:
            raise BadResponse(f"not an HTTP/1.1 status line: {status[:80]!r}")
        code = int(code_text)
        headers = Headers()
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise BadResponse(f"bad header line: {line[:80]!r}")
            headers.addRawHeader(name, value.strip())
        connection = b",".join(headers.getRawHeaders(b"connection", [])).lower()
        self._keep_alive = version == b"HTTP/1.1" and b"close" not in connection
        encoding = b",".join(headers.getRawHeaders(b"transfer-encoding", [])).lower()
        lengths = headers.getRawHeaders(b"content-length")
        length: int | object = UNKNOWN_LENGTH
        if self._method == b"HEAD" or code in _NO_BODY_STATUSES or 100 <= code < 200:
            self._remaining = 0
            length = 0
        elif encoding:
            if encoding != b"chunked" or lengths:
                raise BadResponse(f"unsupported transfer-encoding {encoding!r}")
            self._chunked = True
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                raise BadResponse(f"bad content-length {lengths!r}")
            self._remaining = length = int(lengths[0])
        else:
            self._until_close = True
            self._keep_alive = False
        # Connection-level headers are not the answer's, as with Agent.
        for name in (b"connection", b"keep-alive", b"transfer-encoding", b"content-length"):
            headers.removeHeader(name)
        return LeanResponse(self, code, phrase, headers, length)

    def _body_data(self, data: bytes) -> None:
        if self._chunked:
            self._chunked_data(data)
        elif self._until_close:
            self._deliver(data)
        else:
            assert self._remaining is not None
            piece, extra = data[: self._remaining], data[self._remaining :]
            if extra:
                self._fail_body(BadResponse("the server sent more than its content-length"))
                return
            self._remaining -= len(piece)
            if piece:
                self._deliver(piece)
            if self._remaining == 0:
                self._finished_body = True
                self._end_body()

    def _chunked_data(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer and not self._finished_body:
            if self._chunk_state == "size":
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 1024:
                        self._fail_body(BadResponse("bad chunk size line"))
                    return
                size_text = bytes(self._buffer[:end]).split(b";", 1)[0].strip()
                del self._buffer[: end + 2]
                try:
                    self._chunk_left = int(size_text, 16)
                except ValueError:
                    self._fail_body(BadResponse(f"bad chunk size {size_text[:20]!r}"))
                    return
                self._chunk_state = "data" if self._chunk_left else "trailer"
            elif self._chunk_state == "data":
                piece = bytes(self._buffer[: self._chunk_left])
                del self._buffer[: len(piece)]
                self._chunk_left -= len(piece)
                self._deliver(piece)
                if self._chunk_left == 0:
                    self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    self._fail_body(BadResponse("a chunk does not end with CRLF"))
                    return
                del self._buffer[:2]
                self._chunk_state = "size"
            else:  # trailer lines, up to an empty one
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                if not line:
                    self._finished_body = True
                    if self._buffer:
                        self._fail_body(BadResponse("data after the last chunk"))
                        return
                    self._end_body()
                    return

    def deliver_to(self, protocol: Any) -> None:
        self._body = protocol
        protocol.makeConnection(_BodyTransport(self))
        early, self._early = self._early, []
        for data in early:
            protocol.dataReceived(data)
        if self._finished_body:
            self._end_body()
        elif self._lost_reason is not None:
            self._lost_in_body(self._lost_reason)

    def _deliver(self, data: bytes) -> None:
        if self._body is None:
            self._early.append(data)
        else:
            self._body.dataReceived(data)

    def _end_body(self) -> None:
        if self._body is None:
            return  # delivered when a protocol asks for it
        body, self._body = self._body, None
        self._reset()
        if self._keep_alive and not self.lost:
            self._idle.put(self)
        else:
            self.abort()
        body.connectionLost(Failure(ResponseDone()))

    def _reset(self) -> None:
        self._in_body = self._finished_body = False
        self._remaining = None
        self._chunked = self._until_close = False
        self._chunk_state = "size"
        self._buffer = bytearray()

    def _fail_answer(self, error: Exception) -> None:
        answer, self._answer = self._answer, None
        self.abort()
        if answer is not None:
            answer.errback(ResponseNeverReceived([Failure(error)]))

    def _fail_body(self, error: Exception) -> None:
        self._keep_alive = False
        body, self._body = self._body, None
        self.abort()
        if body is not None:
            body.connectionLost(Failure(ResponseFailed([Failure(error)])))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.lost = True
        self._lost_reason = reason
        self._idle.discard(self)
        if self._answer is not None:
            answer, self._answer = self._answer, None
            answer.errback(ResponseNeverReceived([reason]))
        elif self._in_body and not self._finished_body:
            self._lost_in_body(reason)

    def _lost_in_body(self, reason: Failure) -> None:
        body = self._body
        if body is None:
            return  # told when a protocol asks for the body
        self._body = None
        if self._until_close and not self._aborted:
            # The server closing the connection is how such a body ends.
            body.connectionLost(Failure(http.PotentialDataLoss()))
        else:
            body.connectionLost(Failure(ResponseFailed([reason])))


class _OneConnection(Factory):
    """
    Hands an endpoint the one connection it is to connect, quietly.

    ``connectProtocol``'s factory logs "Starting factory" and "Stopping
    factory" for every connection: two lines for each new upstream
    connection, and one more each time a client that hangs up mid-answer
    costs the proxy its upstream connection.
    """

    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def buildProtocol(self, addr: Any) -> _Connection:
        return self._connection


class _OriginConnections:
    """One origin's kept-alive connections with no request on them."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._connections: deque[_Connection] = deque()

    def take(self) -> _Connection | None:
        while self._connections:
            connection = self._connections.pop()
            if not connection.lost:
                return connection
        return None

    def put(self, connection: _Connection) -> None:
        if len(self._connections) < self._limit:
            self._connections.append(connection)
        else:
            connection.abort()

    def close(self) -> None:
        while self._connections:
            self._connections.pop().abort()

    def discard(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)


class IdleConnections:
    """
    Every origin's kept-alive connections with no request on them: one per
    process, shared by every :class:`LeanAgent` (one per backend, rebuilt on
    each reload), like Twisted's ``HTTPConnectionPool`` for ``Agent``.
    """

    def __init__(self, limit_per_origin: int = 64) -> None:
        self._limit = limit_per_origin
        self._origins: dict[bytes, _OriginConnections] = {}

    def of(self, origin: bytes) -> _OriginConnections:
        idle = self._origins.get(origin)
        if idle is None:
            idle = self._origins[origin] = _OriginConnections(self._limit)
        return idle

    def close(self) -> None:
        """Close every kept-alive connection that has no request on it."""
        for idle in self._origins.values():
            idle.close()


@implementer(IAgent)
class LeanAgent:
    """
    ``IAgent`` for ``http://`` origins over kept-alive connections; other
    schemes, and bodies not held in memory, go to ``fallback``.

    :param endpoints: an ``IAgentEndpointFactory`` (connect timeout
        included), shared with the fallback agent.
    :param idle: where connections wait between requests.
    """

    def __init__(self, endpoints: Any, fallback: IAgent, idle: IdleConnections) -> None:
        self._endpoints = endpoints
        self._fallback = fallback
        self._idle = idle

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        held, body = _held_body(bodyProducer)
        if not uri.startswith(b"http://") or not held:
            return self._fallback.request(method, uri, headers, bodyProducer)
        origin, _, rest = uri[len(b"http://") :].partition(b"/")
        sent = Headers() if headers is None else headers.copy()
        if not sent.hasHeader(b"host"):
            sent.setRawHeaders(b"host", [origin])
        return defer.Deferred.fromCoroutine(self._send(origin, method, b"/" + rest, sent, body))

    async def _send(
        self, origin: bytes, method: bytes, target: bytes, headers: Headers, body: bytes | None
    ) -> IResponse:
        idle = self._idle.of(origin)
        connection = idle.take()
        if connection is None:
            endpoint = self._endpoints.endpointForURI(URI.fromBytes(b"http://" + origin + b"/"))
            connection = _Connection(idle)
            await endpoint.connect(_OneConnection(connection))
        return await connection.send(method, target, headers, body)


def _held_body(producer: IBodyProducer | None) -> tuple[bool, bytes | None]:
    """Whether the body is held in memory (or absent), and the body."""
    if producer is None:
        return True, None
    data = getattr(producer, "body", None)
    if isinstance(data, bytes) and producer.length == len(data):
        return True, data
    return False, None
