"""
Trying routes in order until one answers.

A request may move to the next route (another backend, then a fallback
model) only while nothing has reached the client: for a plain answer, until
it is complete; for a stream, until its first chunk.  Connection failures,
connect timeouts, 5xx and 429 from upstream, and a backend that turns out
not to have the model, move on; anything else (a bad request, a slow model
past its first-byte timeout) is the answer.  The retry budget bounds the
extra attempts, so a request cannot wander over a large pool.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from oproxy.api.scope import Scope
from oproxy.errors import (
    ModelNotFound,
    OProxyError,
    UpstreamBusy,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamUnavailable,
)
from oproxy.routing.router import Route

T = TypeVar("T")

#: Failures another backend might not have.
RETRY_ELSEWHERE = (UpstreamUnavailable, UpstreamConnectTimeout, UpstreamError, UpstreamBusy)
#: Failures that count against a backend's health (busy is not broken).
BACKEND_FAULTS = (UpstreamUnavailable, UpstreamConnectTimeout, UpstreamError)

Chunks = AsyncGenerator[dict[str, Any], None]


async def first_answer(
    scope: Scope, routes: Sequence[Route], attempt: Callable[[Route], Awaitable[T]]
) -> T:
    """The first route's answer that does not fail in a way another route could fix."""
    router = scope.router
    extra_attempts = router.config.retries
    last: OProxyError | None = None
    for route in routes:
        if not router.state.breaker.allow(route.backend.name):
            continue
        scope.trying(route)
        try:
            result = await attempt(route)
        except OProxyError as e:
            scope.gave_up(route)
            if not isinstance(e, (*RETRY_ELSEWHERE, ModelNotFound)):
                raise
            if isinstance(e, BACKEND_FAULTS):
                router.failed(route)
            last = e
            if extra_attempts == 0:
                break
            extra_attempts -= 1
            continue
        router.succeeded(route)
        scope.answered_by(route)
        return result
    if last is None:  # every circuit opened while we were choosing
        raise UpstreamUnavailable("no backend could take the request; please retry")
    if isinstance(last, ModelNotFound):
        raise ModelNotFound(routes[0].client_model)
    raise last


async def first_stream(
    scope: Scope, routes: Sequence[Route], open_stream: Callable[[Route], Awaitable[Chunks]]
) -> Chunks:
    """
    The first route whose stream yields a first chunk; the stream returned
    starts with that chunk.
    """

    async def opened(route: Route) -> Chunks:
        chunks = await open_stream(route)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            return _empty()
        except BaseException:
            await chunks.aclose()
            raise
        return _starting_with(first, chunks)

    return await first_answer(scope, routes, opened)


async def _starting_with(first: dict[str, Any], rest: Chunks) -> Chunks:
    async with aclosing(rest):
        yield first
        async for chunk in rest:
            yield chunk


async def _empty() -> Chunks:
    return
    yield  # pragma: no cover - makes this an async generator
