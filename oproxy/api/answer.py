"""
Answering a generation request: from the response cache when it may and
has the answer, else from the first route that answers, relayed and stored.

The store itself (policy, keys, memory and Redis) is :mod:`oproxy.cache`;
this module is the handler's side, which decides where the answer comes
from.  The lookup happens after authentication and before anything is
fetched or sent upstream, so a hit costs no image download and no model
time.  Only successful, complete answers are stored; a stream is recorded
as it is relayed and stored once it has ended normally.

The cache sits between the plugins' hooks: its key is made from the body
the request hooks left (what the backend is asked), it stores what the
backend answered, and the response and chunk hooks run on every answer,
from the cache or not.  A plugin that changes answers therefore changes
cached ones the same way, and never twice.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson

from oproxy.api.dispatch import first_answer, first_stream
from oproxy.api.scope import Scope
from oproxy.cache import cache_policy, replay
from oproxy.routing.router import Route
from oproxy.streaming import OPENAI_FRAMING, Framing, relay_sse, relay_sse_with_keepalive

#: The proxy's own share of a non-streamed answer's time, in milliseconds.
OVERHEAD_HEADER = b"x-oproxy-overhead-ms"

Chunks = AsyncGenerator[dict[str, Any], None]


@dataclass(frozen=True)
class Shape:
    """
    How a chat answer reaches a client that asked in another API (OpenAI's
    Responses, Anthropic's Messages): the request was translated to a chat
    request, which the backends, the cache and the accounting handle as any
    other; this turns what comes back into the client's API, last.

    The cache keeps the chat answer, so a replay is rendered afresh (new
    ids, the client's own options) like an answer just made.

    :ivar label: the ``route`` label of the time-to-first-token metric.
    :ivar render: a whole ``chat.completion`` as the client's object.
    :ivar events: the chat stream's chunks as the client's events.
    :ivar framing: how those events are written.
    """

    label: str
    render: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
    events: Callable[[Chunks], Chunks]
    framing: Framing = OPENAI_FRAMING


async def answer(
    scope: Scope,
    route_name: str,
    model: str,
    routes: Sequence[Route],
    *,
    stream: bool,
    produce: Callable[[Route], Awaitable[dict[str, Any]]],
    produce_stream: Callable[[Route], Awaitable[AsyncGenerator[dict[str, Any], None]]],
    body: Mapping[str, Any] | None = None,
    shape: Shape | None = None,
) -> bytes | None:
    """
    Serve from the cache when allowed and present; otherwise produce from
    the first route that answers, relay, store.

    The cache key names the pool of backends the model is routed over, not
    the one that happens to answer: any of them gives the same answer.

    :param body: the request the routes answer, when it is not the
        client's own (a chat request translated from another API).
    :param shape: how that API's client is given the answer; ``None`` for
        an OpenAI client, who gets it as it comes.
    """
    request = scope.request
    cache = scope.services.cache
    first = routes[0]
    label = route_name if shape is None else shape.label
    framing = OPENAI_FRAMING if shape is None else shape.framing
    policy = cache_policy(
        route_name,
        scope.body if body is None else body,
        model=first.upstream_model,
        backend=scope.services.router.pool_name(model),
        key_name=scope.caller.subject if scope.caller and scope.caller.name else None,
        cache_control=b", ".join(request.requestHeaders.getRawHeaders(b"cache-control", []))
        or None,
        config=scope.config.cache,
    )
    scope.model_label, scope.backend_label = first.upstream_model, first.backend.name
    hit = await cache.lookup(policy)
    for name, value in cache.headers(policy, hit).items():
        request.setHeader(name, value)
        if name.lower() == b"x-cache":
            scope.cache_status = value.decode("ascii")
            scope.services.metrics.cache.labels(scope.cache_status.lower()).inc()
    hooks = scope.hooks
    if hit is not None:
        if stream:
            replayed = replay(hit)
            if hooks is not None:
                replayed = hooks.stream(replayed)
            if shape is not None:
                replayed = shape.events(replayed)
            await relay_sse(request, _timed(scope, label, replayed), scope.services.clock, framing)
            return None
        made = hit.body
        if hooks is not None:
            made = await hooks.response(made)
        answered = made if shape is None else await shape.render(made)
        if scope.logs_bodies:
            scope.logged_response = answered
        return scope.json(answered)
    if not stream:
        made = await first_answer(scope, routes, produce)
        # Stored (serialised) before any plugin changes it.
        await cache.store(policy, made, stream=False)
        if hooks is not None:
            made = await hooks.response(made)
        answered = made if shape is None else await shape.render(made)
        if scope.logs_bodies:
            scope.logged_response = answered
        request.setHeader(OVERHEAD_HEADER, b"%.3f" % (scope.overhead() * 1000))
        return scope.json(answered)

    async def opened() -> AsyncGenerator[dict[str, Any], None]:
        chunks = cache.recording(policy, await first_stream(scope, routes, produce_stream))
        if hooks is not None:
            # The recording keeps the chunks it passes on: the plugins get copies.
            chunks = hooks.stream(chunks, copy=policy.key is not None and policy.write)
        return _timed(scope, label, chunks if shape is None else shape.events(chunks))

    streaming = scope.config.streaming
    await relay_sse_with_keepalive(
        request,
        opened,
        scope.services.clock,
        after=streaming.keepalive_after,
        interval=streaming.keepalive_interval,
        framing=framing,
    )
    return None


async def _timed(
    scope: Scope, route_name: str, chunks: AsyncGenerator[dict[str, Any], None]
) -> AsyncGenerator[dict[str, Any], None]:
    """Pass the chunks on, noting when the first one came (and them, if logged)."""
    first = True
    kept: list[Any] | None = None
    budget = 0
    if scope.logs_bodies and scope.config.access_log is not None:
        kept, budget = [], scope.config.access_log.body_max_bytes
        scope.logged_response = kept
    async with aclosing(chunks):
        async for chunk in chunks:
            if kept is not None and budget > 0:
                kept.append(chunk)
                budget -= len(orjson.dumps(chunk))
            if first:
                first = False
                scope.first_token_seconds = scope.services.clock.seconds() - scope.started
                scope.services.metrics.first_token.labels(route_name, scope.model_label).observe(
                    scope.first_token_seconds
                )
            yield chunk
