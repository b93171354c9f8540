"""
Relaying a stream to the client as Server-Sent Events.

The relay pulls the first chunk *before* it commits to a 200: an upstream
that fails early gets a proper HTTP error.  After that, each chunk is
written as it arrives (never buffered), the client's own backpressure pauses
the relay, and a failure half-way is sent as an OpenAI error event followed
by the end of the stream, never a silent truncation.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, TypeVar, cast

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from zope.interface import implementer

from oproxy.errors import OProxyError, ServerError, UpstreamError, render_stream_error

log = Logger()

T = TypeVar("T")

SSE_HEADERS = {
    b"Content-Type": b"text/event-stream; charset=utf-8",
    b"Cache-Control": b"no-cache",
    b"X-Accel-Buffering": b"no",
}

DONE = b"data: [DONE]\n\n"


@implementer(IPushProducer)
class ClientPacer:
    """
    Tells the relay when the client's socket is full, and when it has drained.

    Registered as the request's streaming producer, so the HTTP channel
    pauses it when its write buffer is over the high-water mark.
    """

    def __init__(self) -> None:
        self._resumed: defer.Deferred[None] | None = None
        self.paused = False

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


#: Chunks written between two returns to the reactor, which sends them.
FLUSH_EVERY = 64


def _flush(clock: IReactorTime) -> defer.Deferred[None]:
    """
    Let the reactor send what was written before going on.

    Twisted sends written data in the I/O phase of a reactor turn, after the
    timed calls of that turn.  An upstream that delivers a whole answer in
    one read (a cache replay, a fast server) would otherwise be translated
    entirely before the first byte left.  Resuming two timed-call phases
    later puts exactly one I/O phase (the send) in between; doing so after
    the first chunk and every :data:`FLUSH_EVERY` chunks keeps the time to
    first byte short and the stream flowing, for two timers per turn.
    """
    sent: defer.Deferred[None] = defer.Deferred()

    def resume() -> None:
        if not sent.called:  # not cancelled by a client that went away
            sent.callback(None)

    clock.callLater(0, clock.callLater, 0, resume)
    return sent


async def relay_sse(
    request: IRequest, chunks: AsyncGenerator[Any, None], clock: IReactorTime
) -> None:
    """
    Write ``chunks`` to ``request`` as an OpenAI event stream ending in ``[DONE]``.
    """
    async with aclosing(chunks):
        first = await anext(chunks, None)
        if first is None:
            raise UpstreamError("the backend sent an empty stream")
        for name, value in SSE_HEADERS.items():
            request.setHeader(name, value)
        pacer = ClientPacer()
        consumer = cast(IConsumer, request)
        consumer.registerProducer(pacer, True)
        try:
            request.write(sse_event(first))
            await _flush(clock)
            try:
                written = 0
                async for chunk in chunks:
                    request.write(sse_event(chunk))
                    written += 1
                    if pacer.paused:
                        await pacer.drained()
                    elif written % FLUSH_EVERY == 0:
                        await _flush(clock)
            except OProxyError as e:
                request.write(render_stream_error(e))
                return
            except defer.CancelledError:
                raise
            except Exception:
                log.failure("Stream failed after it began")
                request.write(render_stream_error(ServerError()))
                return
            request.write(DONE)
        finally:
            consumer.unregisterProducer()


async def merge(iterators: list[AsyncGenerator[T, None]]) -> AsyncGenerator[T, None]:
    """
    Interleave several async iterators, yielding items as they come.

    Used to run the prompts of one completions request concurrently.  The
    first failure stops the others.
    """
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as only:
            async for item in only:
                yield item
        return
    queue: defer.DeferredQueue[tuple[str, Any]] = defer.DeferredQueue()

    async def pump(iterator: AsyncGenerator[T, None]) -> None:
        async with aclosing(iterator):
            async for item in iterator:
                queue.put(("item", item))
        queue.put(("end", None))

    def failed(failure: Any) -> None:
        if not failure.check(defer.CancelledError):
            queue.put(("error", failure))

    pumps = [defer.Deferred.fromCoroutine(pump(it)).addErrback(failed) for it in iterators]
    remaining = len(pumps)
    try:
        while remaining:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "end":
                remaining -= 1
            else:
                value.raiseException()
    finally:
        for running in pumps:
            running.cancel()
