"""
Relaying a stream to the client as Server-Sent Events.

The relay pulls the first chunk *before* it commits to a 200: an upstream
that fails early gets a proper HTTP error.  After that, each chunk is
written as it arrives (never buffered), the client's own backpressure pauses
the relay, and a failure half-way is sent as an OpenAI error event followed
by the end of the stream, never a silent truncation.

A model that is still loading sends nothing at all for many seconds;
:func:`relay_sse_with_keepalive` commits to the stream once the wait is
clearly long and writes SSE comments meanwhile, so that clients with a read
timeout wait for the answer rather than give up on it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from oproxy.after_send import call_after_send
from oproxy.errors import OProxyError, ServerError, UpstreamError
from oproxy.web.dialects import OPENAI

log = Logger()

T = TypeVar("T")

SSE_HEADERS = {
    b"Content-Type": b"text/event-stream; charset=utf-8",
    b"Cache-Control": b"no-cache",
    b"X-Accel-Buffering": b"no",
}

DONE = b"data: [DONE]\n\n"


def connection_lost(request: IRequest) -> bool:
    """
    Whether the client's connection is gone (the client hung up).

    Twisted's ``Request.connectionLost`` lets go of the request's channel,
    its one way to the socket; ``Request.loseConnection`` asks the same.
    """
    return hasattr(request, "channel") and request.channel is None


@implementer(IPushProducer)
class ClientPacer:
    """
    Tells the relay when the client's socket is full, and when it has drained.

    Used as a context manager around the writes of a stream: it is the
    request's streaming producer meanwhile, so the HTTP channel pauses it
    when its write buffer is over the high-water mark.
    """

    def __init__(self, request: IRequest) -> None:
        self._consumer = cast(IConsumer, request)
        self._request = request
        self._resumed: defer.Deferred[None] | None = None
        self.paused = False

    def __enter__(self) -> ClientPacer:
        self._consumer.registerProducer(self, True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A lost connection took the registration with it: the request
        # dropped its channel and the channel its producer, and
        # ``Request.unregisterProducer`` would fail on the missing channel.
        if not connection_lost(self._request):
            self._consumer.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    async def drained(self) -> None:
        if self.paused:
            self._resumed = defer.Deferred()
            await self._resumed


def sse_event(chunk: Any) -> bytes:
    """One ``data:`` event; OpenAI's streams carry no ``event:`` or ``id:`` lines."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def typed_sse_event(event: Any) -> bytes:
    """
    One event named by its ``type`` on an ``event:`` line, then its
    ``data:``: how the Responses API and Anthropic's Messages API frame
    their streams (their SDKs dispatch on the name).
    """
    name: str = event["type"]
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


#: Chunks written between two returns to the reactor, which sends them.
FLUSH_EVERY = 64


def _flush(clock: IReactorTime) -> defer.Deferred[None]:
    """
    Let the reactor send what was written before going on.

    An upstream that delivers a whole answer in one read (a cache replay, a
    fast server) would otherwise be translated entirely before the first
    byte left (see :mod:`oproxy.after_send`).  Waiting for the send after
    the first chunk and every :data:`FLUSH_EVERY` chunks keeps the time to
    first byte short and the stream flowing, for two timers per turn.
    """
    sent: defer.Deferred[None] = defer.Deferred()

    def resume() -> None:
        if not sent.called:  # not cancelled by a client that went away
            sent.callback(None)

    call_after_send(clock, resume)
    return sent


#: What a client reads while the model loads: an SSE comment, which every
#: conforming parser (the official SDKs included) skips, but which is bytes
#: on the socket, so the client's read timeout starts again.
KEEPALIVE = b": loading\n\n"


@dataclass(frozen=True)
class Framing:
    """
    How one API family's event stream is written.

    :ivar event: one event's bytes.
    :ivar failure: the last event of a stream that fails after it began.
    :ivar ending: what follows the last event of a stream that ends well.
    :ivar keepalive: what is written while the first event is awaited.
    """

    event: Callable[[Any], bytes] = sse_event
    failure: Callable[[OProxyError], bytes] = OPENAI.stream_event
    ending: bytes = DONE
    keepalive: bytes = KEEPALIVE


#: OpenAI's chat and completions streams: ``data:`` events, then ``[DONE]``.
OPENAI_FRAMING = Framing()


async def relay_sse(
    request: IRequest,
    chunks: AsyncGenerator[Any, None],
    clock: IReactorTime,
    framing: Framing = OPENAI_FRAMING,
) -> None:
    """
    Write ``chunks`` to ``request`` as an event stream: by default OpenAI's,
    ending in ``[DONE]``.
    """
    async with aclosing(chunks):
        first = await anext(chunks, None)
        if first is None:
            raise UpstreamError("the backend sent an empty stream")
        _commit(request)
        await _relay_from(request, first, chunks, clock, framing)


def _commit(request: IRequest) -> None:
    """Set the event-stream headers; they leave with the first write."""
    for name, value in SSE_HEADERS.items():
        request.setHeader(name, value)


async def _relay_from(
    request: IRequest,
    first: Any,
    chunks: AsyncGenerator[Any, None],
    clock: IReactorTime,
    framing: Framing,
) -> None:
    """
    Write ``first`` and the rest of ``chunks`` once the stream is committed:
    from here on a failure can only be reported inside the stream.
    """
    event = framing.event
    with ClientPacer(request) as pacer:
        request.write(event(first))
        await _flush(clock)
        try:
            written = 0
            async for chunk in chunks:
                request.write(event(chunk))
                written += 1
                if pacer.paused:
                    await pacer.drained()
                elif written % FLUSH_EVERY == 0:
                    await _flush(clock)
        except OProxyError as e:
            request.write(framing.failure(e))
            return
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("Stream failed after it began")
            request.write(framing.failure(ServerError()))
            return
        if framing.ending:
            request.write(framing.ending)


class _KeepAlive:
    """
    The timers of the wait for a stream's first chunk.

    After ``after`` seconds the response is committed (200, event-stream
    headers) and a keep-alive (by default the :data:`KEEPALIVE` comment)
    written, then another every ``interval`` seconds, until :meth:`stop`.
    """

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        after: float,
        interval: float,
        keepalive: bytes = KEEPALIVE,
    ) -> None:
        self._request = request
        self._clock = clock
        self._interval = interval
        self._keepalive = keepalive
        self.committed = False
        self._call: IDelayedCall = clock.callLater(after, self._beat)

    def _beat(self) -> None:
        if not self.committed:
            self.committed = True
            _commit(self._request)
        self._request.write(self._keepalive)
        self._call = self._clock.callLater(self._interval, self._beat)

    def stop(self) -> None:
        if self._call.active():
            self._call.cancel()


async def _opened(
    open_stream: Callable[[], Awaitable[AsyncGenerator[Any, None]]],
) -> tuple[AsyncGenerator[Any, None], Any]:
    """
    Open the stream and wait for its first chunk (``None``: it was empty).

    A failure out of ``anext`` has already finished the generator, closing
    the upstream: there is nothing left to close here.
    """
    chunks = await open_stream()
    return chunks, await anext(chunks, None)


async def relay_sse_with_keepalive(
    request: IRequest,
    open_stream: Callable[[], Awaitable[AsyncGenerator[Any, None]]],
    clock: IReactorTime,
    *,
    after: float,
    interval: float,
    framing: Framing = OPENAI_FRAMING,
) -> None:
    """
    :func:`relay_sse`, but with SSE comments while the first chunk is awaited.

    Ollama sends nothing, not even headers, while it loads a model, which
    can take longer than a client's read timeout; the client would give up
    on an answer that is on its way.  So the wait is watched: a first chunk
    within ``after`` seconds is relayed exactly as :func:`relay_sse` does,
    and an early failure is still raised, to become a proper HTTP error.
    Past ``after``, the response is committed to a 200 event stream and
    :data:`KEEPALIVE` is written every ``interval`` seconds; from then on a
    failure (the first-byte timeout included) is an error event in the
    stream, as for a failure half-way.

    :param open_stream: connects upstream and returns the chunks; the time
        it takes (the upstream's headers wait for the load) is watched too.
    :param after: seconds of silence before committing; a warm model's
        first token comes well within it, so its errors stay HTTP errors.
    :param interval: seconds between comments; below the shortest read
        timeout a client is likely to use.

    Cancelling (the client went away) cancels the wait, which closes the
    upstream connection, in the keep-alive phase as in the relay.
    """
    keepalive = _KeepAlive(request, clock, after, interval, framing.keepalive)
    try:
        chunks, first = await defer.Deferred.fromCoroutine(_opened(open_stream))
    except defer.CancelledError:
        raise
    except Exception as e:
        if not keepalive.committed:
            raise
        if not isinstance(e, OProxyError):
            log.failure("Stream failed while its first chunk was awaited")
            e = ServerError()
        request.write(framing.failure(e))
        return
    finally:
        keepalive.stop()
    async with aclosing(chunks):
        if first is None:
            empty = UpstreamError("the backend sent an empty stream")
            if not keepalive.committed:
                raise empty
            request.write(framing.failure(empty))
            return
        if not keepalive.committed:
            _commit(request)
        await _relay_from(request, first, chunks, clock, framing)


async def merge(
    iterators: list[AsyncGenerator[T, None]], *, concurrency: int | None = None
) -> AsyncGenerator[T, None]:
    """
    Interleave several async iterators, yielding items as they come.

    Used to run the generations of one request (its prompts, its ``n``
    choices) side by side.  At most ``concurrency`` iterators are pulled at
    once (all of them when ``None``); the next one starts when one ends, so
    iterators that open their upstream lazily (on their first step) never
    have more than that many upstream calls open.  Each iterator is pulled
    only when its previous item has been taken, so a client that reads
    slowly slows every source rather than letting them pile up here.

    The first failure stops the others.  Closing the merge, or a failure,
    closes every iterator, those never started included.
    """
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as only:
            async for item in only:
                yield item
        return
    queue: defer.DeferredQueue[tuple[str, Any, defer.Deferred[None] | None]]
    queue = defer.DeferredQueue()
    waiting = iter(iterators)  # shared: each lane takes the next one when it is free

    async def lane() -> None:
        for iterator in waiting:
            async with aclosing(iterator):
                async for item in iterator:
                    taken: defer.Deferred[None] = defer.Deferred()
                    queue.put(("item", item, taken))
                    await taken
        queue.put(("end", None, None))

    def failed(failure: Any) -> None:
        if not failure.check(defer.CancelledError):
            queue.put(("error", failure, None))

    lanes = len(iterators) if concurrency is None else max(1, min(concurrency, len(iterators)))
    running = [defer.Deferred.fromCoroutine(lane()).addErrback(failed) for _ in range(lanes)]
    remaining = lanes
    taken: defer.Deferred[None] | None = None
    try:
        while remaining:
            kind, value, taken = await queue.get()
            if kind == "item":
                yield value
                if taken is not None:
                    taken.callback(None)
                    taken = None
            elif kind == "end":
                remaining -= 1
            else:
                value.raiseException()
    finally:
        # The lane whose item was taken last may not be waiting yet (its
        # put may be what ran the consumer up to here), so cancelling the
        # lane would not reach it: refuse its item instead, which stops it
        # whenever it gets to wait.
        if taken is not None:
            taken.cancel()
        for each in running:
            each.cancel()
        for never_started in waiting:
            await never_started.aclose()
