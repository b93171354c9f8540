"""
Talking HTTP to an upstream model server: pooled, unbuffered, cancellable.

An :class:`Upstream` is one backend's pooled treq client with the three
timeouts (connect, first byte, between chunks).  Bodies are read by
:class:`BodyReader`, which hands over complete lines as they arrive, pauses
the upstream socket when the reader falls behind, and closes the connection
the moment the caller stops listening, so a model stops generating for a
client that has gone away.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from oproxy.config import BackendConfig
from oproxy.errors import (
    OProxyError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

T = TypeVar("T")

#: Lines buffered from upstream before its socket is paused.
HIGH_WATER_LINES = 256

#: The most a non-streamed upstream answer may weigh (large embedding batches).
MAX_RESPONSE_BYTES = 256 * 1024 * 1024

#: The most of an upstream *error* body worth reading.
MAX_ERROR_BYTES = 64 * 1024

#: Seconds to wait, after an event stream's ``data: [DONE]``, for the body to
#: end: long enough for the closing chunk to arrive (so the connection goes
#: back to the pool), short enough that a server which keeps the body open
#: does not hold back the client's own ``[DONE]``.
AFTER_DONE_GRACE = 1.0


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is already in memory, written in one go.

    treq's default wraps bytes in a ``FileBodyProducer``, which trickles them
    out through a cooperator: a needless trip round the reactor per request.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@dataclass
class UpstreamTime:
    """
    Seconds one request spent waiting for upstream answers, summed.

    What is left of its duration is the proxy's own overhead.
    """

    seconds: float = 0.0


class DeadlineExceeded(Exception):
    """A :func:`within` deadline passed before the awaited result came."""


async def within(waiting: defer.Deferred[T], seconds: float, clock: IReactorTime) -> T:
    """
    Await ``waiting``, cancelling it after ``seconds``.

    Unlike ``Deferred.addTimeout``, this recognises its own expiry whatever
    failure the cancellation produced: Twisted's HTTP client reports a
    cancelled request as ``ResponseNeverReceived``, not ``CancelledError``.
    """
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        waiting.cancel()

    timer = clock.callLater(seconds, expire)
    try:
        return await waiting
    except BaseException:
        if expired:
            raise DeadlineExceeded() from None
        raise
    finally:
        if timer.active():
            timer.cancel()


class BodyReader(Protocol):
    """
    Receive a response body and hand it over line by line, or whole.

    Only one :meth:`next_lines` may be outstanding.  An idle timer, reset by
    every chunk, guards against an upstream that stops half-way.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        backend: str,
        max_bytes: int,
        *,
        split_lines: bool = True,
    ) -> None:
        self._split_lines = split_lines
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._backend = backend
        self._max_bytes = max_bytes
        self._received = 0
        self._partial = b""
        self._lines: deque[bytes] = deque()
        self._waiter: defer.Deferred[None] | None = None
        self._failure: OProxyError | None = None
        self._finished = False
        self._paused = False
        self._idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._idle = self._clock.callLater(self._idle_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        self._received += len(data)
        if self._received > self._max_bytes:
            self._fail(UpstreamError(f"backend {self._backend!r} sent an oversized response"))
            self.abort()
            return
        if not self._split_lines:
            self._lines.append(data)
        elif b"\n" not in data:
            self._partial += data
            return
        else:
            pieces = (self._partial + data).split(b"\n")
            self._partial = pieces.pop()
            self._lines.extend(line for line in pieces if line.strip())
        if len(self._lines) >= HIGH_WATER_LINES and not self._paused:
            self._paused = True
            self._producer().pauseProducing()
        self._wake()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._cancel_idle()
        if reason.check(ResponseDone, http.PotentialDataLoss):
            if self._partial.strip():
                self._lines.append(self._partial)
            self._partial = b""
            self._finished = True
        elif self._failure is None:
            self._failure = UpstreamError(
                f"backend {self._backend!r} closed the connection mid-response"
            )
        self._wake()

    def _producer(self) -> IPushProducer:
        # The HTTP client hands body protocols a producer proxy for its socket.
        return cast(IPushProducer, self.transport)

    def _timed_out(self) -> None:
        self._fail(
            UpstreamTimeout(
                f"backend {self._backend!r} sent nothing for {self._idle_timeout:g} seconds"
            )
        )
        self.abort()

    def _fail(self, failure: OProxyError) -> None:
        if self._failure is None:
            self._failure = failure
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def abort(self) -> None:
        """
        Close the upstream connection now; the model stops generating.
        """
        self._cancel_idle()
        if self.transport is not None and not self._finished:
            self._producer().stopProducing()

    def _stop_waiting(self, waiter: defer.Deferred[None]) -> None:
        """
        The caller stopped listening (the client went away): forget the
        wait, then close the connection.

        The wait is forgotten first: the cancelled Deferred fails with
        ``CancelledError`` on its own, and the connection's end, which
        comes a turn later, must not wake it a second time.
        """
        if self._waiter is waiter:
            self._waiter = None
        self.abort()

    async def next_lines(self, timer: UpstreamTime | None = None) -> list[bytes]:
        """
        The lines received since the last call; an empty list means the end.

        :param timer: where the time spent waiting for them is added.
        """
        if not self._lines:
            started = self._clock.seconds()
            try:
                while not self._lines:
                    if self._failure is not None:
                        raise self._failure
                    if self._finished:
                        return []
                    self._waiter = defer.Deferred(self._stop_waiting)
                    await self._waiter
            finally:
                if timer is not None:
                    timer.seconds += self._clock.seconds() - started
        lines = list(self._lines)
        self._lines.clear()
        if self._paused:
            self._paused = False
            self._producer().resumeProducing()
        return lines

    async def read_all(self, timer: UpstreamTime | None = None) -> bytes:
        """
        The whole body, for answers that are not streamed.

        :param timer: where the time spent waiting for it is added.
        """
        parts: list[bytes] = []
        while batch := await self.next_lines(timer):
            parts.extend(batch)
        return (b"\n" if self._split_lines else b"").join(parts)


@implementer(IAgentEndpointFactory)
class ReusedEndpoints:
    """
    An ``Agent`` endpoint factory that builds one endpoint per origin, once.

    Twisted's default builds a new endpoint (and its TLS policy) for every
    request, which showed in the profile of a proxied request; an endpoint
    can connect any number of times.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host = uri.host.decode("idna")
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            self._endpoints[key] = endpoint
        return endpoint


class Upstream:
    """
    One backend's HTTP client: a persistent connection pool and its timeouts.

    The hot path speaks to an ``IAgent`` directly with URLs prepared once:
    treq's per-request stack (cookie, redirect and decoding agents, URL
    parsing with IDNA) cost a third of a proxied request's CPU time and
    offers nothing an API call to a model server needs.  The agent is
    :class:`oproxy.http11.LeanAgent` for ``http://`` backends, Twisted's
    ``Agent`` for ``https://`` ones.
    """

    def __init__(
        self,
        backend: BackendConfig,
        agent: IAgent,
        clock: IReactorTime,
        *,
        extra_headers: Mapping[str, str] | None = None,
    ):
        """
        :param extra_headers: sent with every request, e.g. the backend's own
            ``Authorization``; built once here, not per request.
        """
        self.backend = backend
        self._agent = agent
        self._clock = clock
        self._base = backend.url.encode("ascii")
        headers = {b"Content-Type": [b"application/json"], b"Accept": [b"application/json"]}
        if backend.host_header:
            headers[b"Host"] = [backend.host_header.encode("ascii")]
        for name, value in (extra_headers or {}).items():
            headers[name.encode("ascii")] = [value.encode("latin-1")]
        self._headers = Headers(headers)

    @property
    def name(self) -> str:
        return self.backend.name

    async def _send(
        self, method: str, path: str, body: bytes | None, timer: UpstreamTime | None = None
    ) -> IResponse:
        """
        Send a request and wait for its answer's head.

        :param timer: where the time spent waiting for it is added.
        """
        started = self._clock.seconds()
        request = self._agent.request(
            method.encode("ascii"),
            self._base + path.encode("ascii"),
            self._headers,
            BytesProducer(body) if body is not None else None,
        )
        try:
            response: IResponse = await within(
                request, self.backend.timeouts.first_byte, self._clock
            )
        except DeadlineExceeded:
            raise UpstreamTimeout(
                f"backend {self.name!r} did not answer within "
                f"{self.backend.timeouts.first_byte:g} seconds"
            ) from None
        except error.TimeoutError:
            raise UpstreamConnectTimeout(
                f"backend {self.name!r} did not accept a connection within "
                f"{self.backend.timeouts.connect:g} seconds"
            ) from None
        except defer.CancelledError:
            raise
        except ResponseNeverReceived as e:
            if all(reason.check(defer.CancelledError) for reason in e.reasons):
                # The client left before the answer began: not the backend's fault.
                raise defer.CancelledError() from None
            raise UpstreamUnavailable(
                f"backend {self.name!r} at {self.backend.url} is unreachable: {_describe(e)}"
            ) from None
        except Exception as e:
            raise UpstreamUnavailable(
                f"backend {self.name!r} at {self.backend.url} is unreachable: {_describe(e)}"
            ) from None
        finally:
            if timer is not None:
                timer.seconds += self._clock.seconds() - started
        return response

    def _reader(self, response: IResponse, max_bytes: int) -> BodyReader:
        reader = BodyReader(self._clock, self.backend.timeouts.between_chunks, self.name, max_bytes)
        response.deliverBody(reader)
        return reader

    async def request_json(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        timer: UpstreamTime | None = None,
    ) -> tuple[int, Any]:
        """
        Send a JSON request; return the status and the decoded JSON answer.

        Cancelling the caller aborts the connection, streaming or not.
        """
        status, _, answer = await self.send_json(method, path, payload, timer)
        return status, answer

    async def stream_json_lines(
        self, path: str, payload: Mapping[str, Any], timer: UpstreamTime | None = None
    ) -> tuple[int, AsyncGenerator[Any, None]]:
        """
        Send a JSON request whose answer is NDJSON; iterate over decoded lines.

        A non-200 status is returned with an iterator over its (single) body.
        """
        response = await self._send("POST", path, orjson.dumps(payload), timer)
        limit = MAX_RESPONSE_BYTES if response.code == 200 else MAX_ERROR_BYTES
        return response.code, self._decoded_lines(self._reader(response, limit), timer)

    async def _decoded_lines(
        self, reader: BodyReader, timer: UpstreamTime | None
    ) -> AsyncGenerator[Any, None]:
        try:
            while batch := await reader.next_lines(timer):
                for line in batch:
                    yield _decode(line, self.name)
        finally:
            reader.abort()

    async def send_json(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        timer: UpstreamTime | None = None,
    ) -> tuple[int, Headers, Any]:
        """
        :meth:`request_json`, with the answer's headers too: an error's
        ``Retry-After`` is worth passing on to the client.
        """
        body = orjson.dumps(payload) if payload is not None else None
        response = await self._send(method, path, body, timer)
        limit = MAX_RESPONSE_BYTES if response.code == 200 else MAX_ERROR_BYTES
        raw = await self._reader(response, limit).read_all(timer)
        return response.code, response.headers, _decode(raw, self.name)

    async def get_bytes(self, path: str) -> tuple[int, Headers, bytes]:
        """
        ``GET`` a route that does not answer JSON (a Prometheus ``/metrics``
        page): the status, headers and body as they came.
        """
        response = await self._send("GET", path, None)
        limit = MAX_RESPONSE_BYTES if response.code == 200 else MAX_ERROR_BYTES
        return response.code, response.headers, await self._reader(response, limit).read_all()

    async def stream_events(
        self, path: str, payload: Mapping[str, Any], timer: UpstreamTime | None = None
    ) -> tuple[int, Headers, AsyncGenerator[Any, None]]:
        """
        Send a JSON request whose answer is an OpenAI event stream; iterate
        over the decoded ``data:`` payloads up to ``data: [DONE]``.

        Every OpenAI-compatible server writes one JSON object per ``data:``
        line, so lines are decoded one by one; comments (``: keep-alive``) and
        ``event:``/``id:`` lines are skipped.  A body that ends without
        ``[DONE]`` was cut short and raises :class:`UpstreamError`.  A non-200
        status is returned with an iterator over its one (JSON) body.
        """
        response = await self._send("POST", path, orjson.dumps(payload), timer)
        if response.code != 200:
            reader = self._reader(response, MAX_ERROR_BYTES)
            return response.code, response.headers, self._whole_body(reader, timer)
        reader = self._reader(response, MAX_RESPONSE_BYTES)
        return response.code, response.headers, self._events(reader, timer)

    async def _whole_body(
        self, reader: BodyReader, timer: UpstreamTime | None
    ) -> AsyncGenerator[Any, None]:
        """An error answer, whole: OpenAI's bodies are pretty-printed JSON."""
        try:
            raw = await reader.read_all(timer)
        finally:
            reader.abort()
        yield _decode(raw, self.name)

    async def _events(
        self, reader: BodyReader, timer: UpstreamTime | None
    ) -> AsyncGenerator[Any, None]:
        try:
            while True:
                batch = await reader.next_lines(timer)
                if not batch:
                    raise UpstreamError(
                        f"backend {self.name!r} ended the stream before it was complete"
                    )
                for line in batch:
                    data = sse_data(line)
                    if data is None:
                        continue
                    if data.startswith(b"[DONE]"):
                        await self._end_of_body(reader)
                        return
                    yield _decode(data, self.name)
        finally:
            reader.abort()

    async def _end_of_body(self, reader: BodyReader) -> None:
        """
        Read on to the end of the body after ``[DONE]``, briefly, so that the
        connection can be reused rather than aborted.
        """
        try:
            while await within(
                defer.Deferred.fromCoroutine(reader.next_lines()), AFTER_DONE_GRACE, self._clock
            ):
                pass
        except (DeadlineExceeded, OProxyError):
            pass  # the answer is complete; the connection is closed instead


def sse_data(line: bytes) -> bytes | None:
    """
    The payload of one server-sent-events line if it is a ``data:`` field
    (one leading space dropped, as the SSE specification says), else ``None``.
    """
    if not line.startswith(b"data:"):
        return None
    data = line[5:].rstrip(b"\r")
    return data[1:] if data.startswith(b" ") else data


def _decode(raw: bytes, backend: str) -> Any:
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw[:200].decode("utf-8", "replace")
        return {"error": text} if text else None


def _describe(e: BaseException) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.DNSLookupError):
        return "host name not found"
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(str(r.value) or type(r.value).__name__ for r in reasons)
    return str(e) or type(e).__name__
