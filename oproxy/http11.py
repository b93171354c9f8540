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

The answers are parsed by hand: h11 in its place cost twice the CPU per
call (``bench/client_cpu.py`` with ``bench/h11_client.py``).  What keeps
one caller from reading another's answer on a reused connection is proved
in ``tests/test_http11_framing.py``: generated conversations of every
framing, cut at arbitrary bytes and at every byte.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IPushProducer
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
_CONNECTION_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
)


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

    abortConnection = stopProducing  # what readBody calls when cancelled


# What a connection reads next.
_IDLE = 0  # nothing: no request is waiting (any byte makes the connection unusable)
_HEAD = 1  # a status line and headers
_LENGTH = 2  # a body of known length
_CHUNKED = 3  # a chunked body
_UNTIL_CLOSE = 4  # a body that ends with the connection
_DONE = 5  # nothing more: the body ended, its protocol has not been told yet

# Where a chunked body is.
_SIZE = 0  # a chunk-size line
_DATA = 1  # a chunk's data
_DATA_END = 2  # the CRLF after a chunk's data
_TRAILER = 3  # trailer lines, up to an empty one

#: A chunk size, as RFC 9112 has it: hexadecimal digits (``int(x, 16)``
#: would also take a sign, ``0x`` and underscores).
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: The longest chunk-size line (with its extensions) or trailer line.
_MAX_CHUNK_LINE = 4096


class ClosedWhenReused(ResponseNeverReceived):
    """
    A kept-alive connection closed under a request, before a byte of its
    answer: the server had closed it as idle just as the request went out.

    Servers close idle connections after a while (uvicorn after 5 seconds,
    Twisted after 60); a request that takes such a connection in that
    instant was never read, and is sent again on a new connection rather
    than failed, which would count against the backend's health.
    """

    def __init__(self, reasons: list[Failure]) -> None:
        super().__init__(reasons)  # type: ignore[no-untyped-call]


class _Connection(Protocol):
    """
    One kept-alive connection, one request at a time.

    The bytes of an answer are read in order: its head, then its body as
    the head frames it (a length, chunks, or until the server closes), and
    the connection goes back to the idle list only once the body's end has
    been read and told to its protocol.  A byte that arrives when no answer
    is expected makes the connection unusable: it could only be the start
    of someone else's answer, or a server and a client that disagree on
    where an answer ends.
    """

    def __init__(self, idle: _OriginConnections) -> None:
        self._idle = idle
        self._reading = _IDLE
        self._buffer = bytearray()  # a head, or chunk framing, not read whole yet
        self._answer: defer.Deferred[LeanResponse] | None = None
        self._method = b""
        self._remaining = 0  # of a body of known length, or of a chunk
        self._chunk = _SIZE
        self._keep_alive = True
        self._body: Any = None  # the body protocol, once delivered
        self._early: list[bytes] = []  # body bytes before deliverBody
        self._failure: Failure | None = None  # why the body failed, before deliverBody
        self._aborted = False
        self.lost = False
        #: Requests sent on this connection so far.
        self.sent = 0
        #: Whether a byte has arrived since the last request went out.
        self._heard = False

    @property
    def usable(self) -> bool:
        """Whether a request may go out on this connection."""
        return not self.lost and not self._aborted

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
        self.sent += 1
        self._heard = False
        self._reading = _HEAD
        self._answer = defer.Deferred(self._cancel_answer)
        return self._answer

    def _cancel_answer(self, _: object) -> None:
        self._answer = None  # the Deferred fails with CancelledError itself
        self._reading = _IDLE
        self.abort()

    def abort(self) -> None:
        """Close the connection: it serves no request after this one."""
        self._keep_alive = False
        self._idle.discard(self)
        if self.transport is not None and not self.lost and not self._aborted:
            self._aborted = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- the answer ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        reading = self._reading
        if reading is _LENGTH:
            self._length_data(data)
        elif reading is _HEAD:
            self._head_data(data)
        elif reading is _CHUNKED:
            self._chunked_data(data)
        elif reading is _UNTIL_CLOSE:
            self._deliver(data)
        else:
            self._surplus()

    def _head_data(self, data: bytes) -> None:
        if self._answer is None:  # cancelled
            self.abort()
            return
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD_BYTES:
            if len(data) > MAX_HEAD_BYTES:
                self._fail_answer(BadResponse("the answer's head is too large"))
            elif not self._buffer:
                self._buffer += data
            return
        self._buffer = bytearray()
        head, rest = data[:end], data[end + 4 :]
        try:
            response = self._parse_head(head)
        except (BadResponse, ValueError) as e:
            self._fail_answer(e if isinstance(e, BadResponse) else BadResponse(str(e)))
            return
        if response is None:  # an interim answer (103 Early Hints, say): the real one follows
            if rest:
                self._head_data(rest)
            return
        # The body's bytes that came with the head are read first: a
        # protocol given the body in the callback below gets them, and
        # surplus bytes fail the answer before anyone is told it ended.
        if rest:
            self.dataReceived(rest)
        answer, self._answer = self._answer, None
        assert answer is not None
        answer.callback(response)

    def _parse_head(self, head: bytes) -> LeanResponse | None:
        """The answer's head, and how its body is framed; None for an interim answer."""
        status, *header_lines = head.split(b"\r\n")
        version, _, remainder = status.partition(b" ")
        code_text, _, phrase = remainder.partition(b" ")
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(code_text) != 3
            or not code_text.isdigit()
        ):
            raise BadResponse(f"not an HTTP/1.1 status line: {status[:80]!r}")
        code = int(code_text)
        if code == 101:
            raise BadResponse("the server switched protocols, which nobody asked for")
        if code < 200:
            return None
        # Connection-level headers are read here and not passed on, as with Agent.
        headers = Headers()
        connection: list[bytes] = []
        encodings: list[bytes] = []
        lengths: list[bytes] = []
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise BadResponse(f"bad header line: {line[:80]!r}")
            lower = name.lower()
            if lower in _CONNECTION_HEADERS:
                if lower == b"content-length":
                    lengths.append(value.strip())
                elif lower == b"transfer-encoding":
                    encodings.append(value.strip())
                elif lower == b"connection":
                    connection.append(value.strip())
            else:
                headers.addRawHeader(name, value.strip())
        self._keep_alive = version == b"HTTP/1.1" and b"close" not in b",".join(connection).lower()
        encoding = b",".join(encodings).lower()
        length: int | object = UNKNOWN_LENGTH
        if self._method == b"HEAD" or code in _NO_BODY_STATUSES:
            length = 0
            self._reading = _DONE
        elif encoding:
            if encoding != b"chunked" or lengths:
                raise BadResponse(f"unsupported transfer-encoding {encoding!r}")
            self._reading = _CHUNKED
            self._chunk = _SIZE
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                raise BadResponse(f"bad content-length {lengths!r}")
            self._remaining = length = int(lengths[0])
            self._reading = _LENGTH if length else _DONE
        else:
            self._reading = _UNTIL_CLOSE
            self._keep_alive = False
        return LeanResponse(self, code, phrase, headers, length)

    def _length_data(self, data: bytes) -> None:
        remaining = self._remaining
        if len(data) > remaining:
            self._fail_body(BadResponse("the server sent more than its content-length"))
            return
        self._remaining = remaining - len(data)
        if data:
            self._deliver(data)
        if not self._remaining:
            self._finish()

    def _chunked_data(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while buffer:
            if self._chunk == _DATA:
                piece = bytes(buffer[: self._remaining])
                del buffer[: len(piece)]
                self._remaining -= len(piece)
                self._deliver(piece)
                if not self._remaining:
                    self._chunk = _DATA_END
                continue
            if self._chunk == _DATA_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    self._fail_body(BadResponse("a chunk does not end with CRLF"))
                    return
                del buffer[:2]
                self._chunk = _SIZE
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > _MAX_CHUNK_LINE:
                    self._fail_body(BadResponse("a chunk-size line or trailer is too long"))
                return
            line = bytes(buffer[:end])
            del buffer[: end + 2]
            if self._chunk == _SIZE:
                size = line.split(b";", 1)[0].rstrip(b" \t")
                if not _CHUNK_SIZE.fullmatch(size):
                    self._fail_body(BadResponse(f"bad chunk size {size[:20]!r}"))
                    return
                self._remaining = int(size, 16)
                self._chunk = _DATA if self._remaining else _TRAILER
            elif not line:  # the empty line after the trailers: the body's end
                if buffer:
                    self._fail_body(BadResponse("the server sent more than its last chunk"))
                    return
                self._finish()
                return

    def _surplus(self) -> None:
        """Bytes after the answer's end, or with no request waiting."""
        if self._reading is _DONE:
            # Read before anyone was told the body ended: it fails.
            self._fail_body(BadResponse("the server sent more than its answer"))
        else:
            self.abort()

    def deliver_to(self, protocol: Any) -> None:
        self._body = protocol
        protocol.makeConnection(_BodyTransport(self))
        early, self._early = self._early, []
        for data in early:
            protocol.dataReceived(data)
        if self._reading is _DONE:
            self._tell(self._failure)

    def _deliver(self, data: bytes) -> None:
        if self._body is None:
            self._early.append(data)
        else:
            self._body.dataReceived(data)

    def _finish(self, failure: Failure | None = None) -> None:
        """The body ended (or failed): tell its protocol now, or when it asks for the body."""
        self._reading = _DONE
        if self._body is None:
            self._failure = failure
        else:
            self._tell(failure)

    def _tell(self, failure: Failure | None) -> None:
        """Tell the body's protocol how the body ended; the connection is free again."""
        body, self._body = self._body, None
        self._reading = _IDLE
        self._failure = None
        self._buffer = bytearray()
        if failure is None and self._keep_alive and self.usable:
            self._idle.put(self)
        else:
            self.abort()
        body.connectionLost(failure or Failure(ResponseDone()))

    def _fail_answer(self, error: Exception) -> None:
        answer, self._answer = self._answer, None
        self._reading = _IDLE
        self.abort()
        if answer is not None:
            answer.errback(ResponseNeverReceived([Failure(error)]))

    def _fail_body(self, error: Exception) -> None:
        self.abort()
        self._finish(Failure(ResponseFailed([Failure(error)])))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.lost = True
        self._idle.discard(self)
        reading = self._reading
        if self._answer is not None:
            answer, self._answer = self._answer, None
            self._reading = _IDLE
            if self.sent > 1 and not self._heard:
                answer.errback(ClosedWhenReused([reason]))
            else:
                answer.errback(ResponseNeverReceived([reason]))
        elif reading is _UNTIL_CLOSE and not self._aborted:
            # The server closing the connection is how such a body ends.
            self._finish(Failure(http.PotentialDataLoss()))
        elif reading is _LENGTH or reading is _CHUNKED or reading is _UNTIL_CLOSE:
            self._finish(Failure(ResponseFailed([reason])))


class _OriginConnections:
    """One origin's kept-alive connections with no request on them."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._connections: deque[_Connection] = deque()

    def take(self) -> _Connection | None:
        while self._connections:
            connection = self._connections.pop()
            if connection.usable:
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
        if connection is not None:
            try:
                return await connection.send(method, target, headers, body)
            except ClosedWhenReused:
                pass  # the server had closed it as idle: once more, on a new one
        endpoint = self._endpoints.endpointForURI(URI.fromBytes(b"http://" + origin + b"/"))
        fresh: _Connection = await endpoint.connect(_OneConnection(_Connection(idle)))
        return await fresh.send(method, target, headers, body)


class _OneConnection(Factory):
    """
    The factory of one upstream connection, as ``connectProtocol`` makes,
    but quiet: Twisted's logs "Starting factory" and "Stopping factory" for
    each, two lines in the daemon's log for every connection it opens.
    """

    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def buildProtocol(self, addr: IAddress | None) -> _Connection:
        return self._connection


def _held_body(producer: IBodyProducer | None) -> tuple[bool, bytes | None]:
    """Whether the body is held in memory (or absent), and the body."""
    if producer is None:
        return True, None
    data = getattr(producer, "body", None)
    if isinstance(data, bytes) and producer.length == len(data):
        return True, data
    return False, None
