"""
Trying routes in order until one answers.

A request may move to the next route (another backend, then a fallback
model) only while nothing has reached the client: for a plain answer, until
it is complete; for a stream, until its first chunk.  Connection failures,
connect timeouts, 5xx and 429 from upstream, and a backend that turns out
not to have the model, move on; anything else (a bad request, a slow model
past its first-byte timeout) is the answer.  The retry budget bounds the
extra attempts, so a request cannot wander over a large pool.

Every attempt's outcome goes to the circuit breaker (:func:`outcome_of`
says what it teaches), even when the client left half way: a trial request
that vanished without a word would hold its circuit shut.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from twisted.internet import defer

from oproxy.api.scope import Scope
from oproxy.errors import (
    BackendsDown,
    ModelNotFound,
    OProxyError,
    UpstreamBusy,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamUnavailable,
)
from oproxy.routing.breaker import (
    ANSWERED,
    BACKEND_DOWN,
    BACKEND_UP,
    MODEL_FAILED,
    UNKNOWN,
    Outcome,
)
from oproxy.routing.router import Route, circuit_model

T = TypeVar("T")

#: Failures another backend might not have.
RETRY_ELSEWHERE = (UpstreamUnavailable, UpstreamConnectTimeout, UpstreamError, UpstreamBusy)
#: The server could not be reached: the whole backend is suspect.
UNREACHABLE = (UpstreamUnavailable, UpstreamConnectTimeout)


def outcome_of(error: BaseException) -> Outcome:
    """
    What a failed attempt says about its backend and model.

    Unreachable (refused, reset, connect timeout): the backend is down.  An
    error the server answered with and did not blame on the request (a 5xx,
    a cut stream): the model is failing there, the backend is up.  Busy (429,
    503): up and loaded, not broken.  Anything else (the client's own
    mistake, a model past its first-byte timeout, a client that left)
    teaches nothing.
    """
    if isinstance(error, UNREACHABLE):
        return BACKEND_DOWN
    if isinstance(error, UpstreamError):
        return MODEL_FAILED
    if isinstance(error, UpstreamBusy):
        return BACKEND_UP
    return UNKNOWN


Chunks = AsyncGenerator[dict[str, Any], None]


async def first_answer(
    scope: Scope, routes: Sequence[Route], attempt: Callable[[Route], Awaitable[T]]
) -> T:
    """The first route's answer that does not fail in a way another route could fix."""
    router = scope.services.router
    extra_attempts = router.config.retries
    last: OProxyError | None = None
    for route in routes:
        permit = router.permit(route)
        if isinstance(permit, defer.Deferred):  # a trial, claimed in the shared state
            permit = await permit
        if permit is None:
            continue
        scope.trying(route)
        try:
            result = await attempt(route)
        except OProxyError as e:
            scope.gave_up(route)
            router.report(route, permit, outcome_of(e))
            if not isinstance(e, (*RETRY_ELSEWHERE, ModelNotFound)):
                raise
            last = e
            if extra_attempts == 0:
                break
            extra_attempts -= 1
            continue
        except BaseException:
            router.report(route, permit, UNKNOWN)
            raise
        router.report(route, permit, ANSWERED)
        scope.answered_by(route)
        return result
    if last is None and not routes:
        raise UpstreamUnavailable("no backend could take the request; please retry")
    if last is None:  # every circuit opened, or another process took the trial
        breaker = router.state.breaker
        wait = min(
            breaker.retry_after(r.backend.name, circuit_model(r.backend, r.upstream_model))
            for r in routes
        )
        raise BackendsDown(routes[0].client_model, [r.backend.name for r in routes], wait)
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
