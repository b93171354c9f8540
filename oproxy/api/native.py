"""
Ollama's native API (``/api/*``), for the clients that speak it.

Open WebUI, the ``ollama`` Python and JavaScript libraries and many editors
talk to Ollama, not to OpenAI.  Served here, they get the same keys, model
permissions, limits, routing, metrics and access log as the OpenAI routes,
and see an Ollama: bodies pass through as Ollama defines them, answers come
back as Ollama frames them (NDJSON streams by default), and errors are
Ollama's ``{"error": "..."}`` (:data:`oproxy.web.dialects.OLLAMA`).  Only
the model name is touched: an alias goes upstream as its target and comes
back as the alias, and a model's configured defaults are merged under the
client's ``options``.

Listings and model management live in :mod:`oproxy.api.native_models`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

import orjson
from twisted.internet import defer
from twisted.logger import Logger

from oproxy.api.dispatch import first_answer, first_stream
from oproxy.api.scope import Scope
from oproxy.backends.base import INativeOllama
from oproxy.backends.ollama import ollama_error
from oproxy.errors import (
    AnsweredBusy,
    AnsweredFailure,
    AnsweredRefusal,
    InvalidRequest,
    ModelNotFound,
    OProxyError,
    ServerError,
    UpstreamError,
)
from oproxy.routing.router import Route
from oproxy.streaming import ClientPacer
from oproxy.web.dialects import OLLAMA

log = Logger()

Lines = AsyncGenerator[dict[str, Any], None]

#: What Ollama (gin) labels its JSON answers with (its errors too).
JSON_TYPE = OLLAMA.content_type
NDJSON_TYPE = b"application/x-ndjson"

#: Rule options that are not Ollama ``options`` keys, and where they go.
_TOP_LEVEL = frozenset(("keep_alive",))
_AS_NUM_PREDICT = frozenset(("max_tokens", "max_completion_tokens"))
_NOT_OLLAMA = frozenset(("reasoning_effort",))


# -- errors from Ollama backends ------------------------------------------------


def verbatim_error(status: int, body: Any, backend: str) -> OProxyError:
    """An Ollama error answer as the error a native client should get."""
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        # An empty 403 is Ollama's Host check; ollama_error explains that.
        return ollama_error(status, body, "", backend)
    if status in (429, 503):
        return AnsweredBusy(status, message, backend)
    if status >= 500:
        return AnsweredFailure(status, message, backend)
    return AnsweredRefusal(status, message, backend)


def answered_error(status: int, body: Any, route: Route, backend: str) -> OProxyError:
    """
    :func:`verbatim_error`, except that a missing model is
    :class:`ModelNotFound`: dispatch tries the next backend, and the client
    is told the name it asked for, not an alias's target.
    """
    message = body.get("error") if isinstance(body, dict) else None
    if status == 404 and isinstance(message, str) and "not found" in message:
        return ModelNotFound(route.client_model)
    return verbatim_error(status, body, backend)


# -- requests -------------------------------------------------------------------


def requested_model(scope: Scope, *, legacy: bool = False) -> str:
    """
    The body's ``model`` (or, where Ollama still takes it, the deprecated
    ``name``), also left in ``scope.body["model"]`` for admission.
    """
    body = scope.body
    model = body.get("model")
    if legacy and not model:
        model = body.get("name")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model is required", param="model")
    body["model"] = model
    return model


def streams(scope: Scope) -> bool:
    """Ollama streams unless the client says ``"stream": false``."""
    stream = scope.body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean", param="stream")
    return stream is not False


def forwarded(route: Route, sent: Mapping[str, Any], *, defaults: bool = True) -> dict[str, Any]:
    """
    The client's body for ``route``: the backend's model name, the model's
    configured defaults under the client's own ``options`` (``keep_alive``
    at the top level, ``max_tokens`` as ``num_predict``).
    """
    body = {name: value for name, value in sent.items() if name != "name"}
    body["model"] = route.upstream_model
    if not defaults or not route.options:
        return body
    given = sent.get("options")
    options = dict(given) if isinstance(given, dict) else {}
    for name, value in route.options:
        if name in _TOP_LEVEL:
            body.setdefault(name, value)
        elif name in _AS_NUM_PREDICT:
            options.setdefault("num_predict", value)
        elif name not in _NOT_OLLAMA:
            options.setdefault(name, value)
    if options:
        body["options"] = options
    return body


def ollama_routes(routes: list[Route], model: str) -> list[Route]:
    """Only a backend that speaks Ollama's native API can answer it."""
    kept = [route for route in routes if INativeOllama.providedBy(route.backend)]
    if not kept:
        raise ModelNotFound(model)
    return kept


def _native(route: Route) -> INativeOllama:
    """The route's backend, which :func:`ollama_routes` kept for speaking Ollama."""
    return INativeOllama(route.backend)


# -- inference --------------------------------------------------------------------


async def chat(scope: Scope) -> bytes | None:
    return await _infer(scope, "/api/chat", "chat", stream=streams(scope))


async def generate(scope: Scope) -> bytes | None:
    return await _infer(scope, "/api/generate", "completions", stream=streams(scope))


async def embed(scope: Scope) -> bytes | None:
    return await _infer(scope, "/api/embed", "embeddings", stream=False)


async def embeddings(scope: Scope) -> bytes | None:
    return await _infer(scope, "/api/embeddings", "embeddings", stream=False)


async def show(scope: Scope) -> bytes | None:
    # Charged as an embedding is: one request, no completion tokens.
    return await _infer(scope, "/api/show", "embeddings", stream=False, legacy=True)


async def _infer(
    scope: Scope, path: str, estimate_as: str, *, stream: bool, legacy: bool = False
) -> bytes | None:
    """Admit, route to the Ollama backends, and answer as Ollama would."""
    model = requested_model(scope, legacy=legacy)
    _, routes = await scope.admitted_routes(estimate_as)
    routes = ollama_routes(routes, model)
    if path in ("/api/chat", "/api/generate"):
        await scope.services.images.prepare_native(scope.body, scope.config.images)
    inference = path != "/api/show"
    if stream:

        async def open_lines(route: Route) -> Lines:
            status, lines = await _native(route).upstream.stream_json_lines(
                path, forwarded(route, scope.body), scope.upstream_time
            )
            if status != 200:
                async with aclosing(lines):
                    error = await anext(lines, None)
                raise answered_error(status, error, route, route.backend.name)
            return _accounted(scope, route, lines)

        await relay_ndjson(scope, await first_stream(scope, routes, open_lines), path)
        return None

    async def post(route: Route) -> tuple[Route, dict[str, Any]]:
        status, answer = await _native(route).upstream.request_json(
            "POST", path, forwarded(route, scope.body, defaults=inference), scope.upstream_time
        )
        if status != 200:
            raise answered_error(status, answer, route, route.backend.name)
        if not isinstance(answer, dict):
            raise UpstreamError(f"backend {route.backend.name!r} sent an answer that is not JSON")
        return route, answer

    route, answer = await first_answer(scope, routes, post)
    if inference:
        _renamed(answer, route)
        _count_usage(scope, route, answer)
    if path == "/api/embeddings" and scope.ticket is not None:
        # The legacy route reports no token count: the estimate stands.
        scope.prompt_tokens = scope.ticket.plan.prompt_estimate
    if scope.hooks is not None:
        answer = await scope.hooks.response(answer)
    if scope.logs_bodies:
        scope.logged_response = answer
    return render_json(scope, answer)


def _renamed(line: dict[str, Any], route: Route) -> None:
    """Answers carry the name the client asked for (an alias), not the target's."""
    if "model" in line and line["model"] != route.client_model:
        line["model"] = route.client_model


def _count_usage(scope: Scope, route: Route, answer: Mapping[str, Any]) -> None:
    """Tokens from a final answer's counts (Ollama leaves zeros out)."""
    if "prompt_eval_count" not in answer and "eval_count" not in answer:
        return
    usage = {
        "prompt_tokens": _count(answer.get("prompt_eval_count")),
        "completion_tokens": _count(answer.get("eval_count")),
    }
    scope.prompt_tokens = usage["prompt_tokens"]
    scope.completion_tokens = usage["completion_tokens"]
    scope.services.metrics.count_tokens(usage, model=route.client_model, key=scope.key_name)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


async def _accounted(scope: Scope, route: Route, lines: AsyncGenerator[Any, None]) -> Lines:
    """
    One backend's lines, renamed, with their tokens counted: from the
    ``done`` line, or, when the stream is cut short (the client left, the
    backend failed), one completion token per line generated, since Ollama
    streams a token a line.
    """
    generated, finished = 0, False
    try:
        async with aclosing(lines):
            async for line in lines:
                if not isinstance(line, dict):
                    continue
                if line.get("done") is True:
                    finished = True
                    _count_usage(scope, route, line)
                elif line.get("done") is False:
                    generated += 1
                _renamed(line, route)
                yield line
    finally:
        if not finished and generated:
            scope.partial_completion_tokens += generated
            scope.services.metrics.count_tokens(
                {"completion_tokens": generated}, model=route.client_model, key=scope.key_name
            )


def ndjson_line(payload: Any) -> bytes:
    return orjson.dumps(payload) + b"\n"


async def relay_ndjson(scope: Scope, lines: Lines, route_name: str | None = None) -> None:
    """
    Write ``lines`` as Ollama does: ``application/x-ndjson``, one JSON object
    and a newline per write, as they come.

    The first line is awaited before anything is committed, so an early
    failure is still an HTTP error; a failure after it is a last
    ``{"error": ...}`` line, exactly as Ollama ends a stream that failed.
    The plugins' chunk hooks see each line, as Ollama frames it.
    The client's socket paces the relay, and a client that leaves cancels
    it, which closes the upstream connection: the model stops generating.

    :param route_name: the route to note the time to the first token for,
        when the lines are tokens.
    """
    request = scope.request
    if scope.hooks is not None:
        lines = scope.hooks.stream(lines)
    async with aclosing(lines):
        first = await anext(lines, None)
        if first is None:
            raise UpstreamError("the backend sent an empty stream")
        request.setHeader(b"content-type", NDJSON_TYPE)
        if route_name is not None:
            scope.first_token_seconds = scope.services.clock.seconds() - scope.started
            scope.services.metrics.first_token.labels(route_name, scope.model_label).observe(
                scope.first_token_seconds
            )
        with ClientPacer(request) as pacer:
            request.write(ndjson_line(first))
            try:
                async for line in lines:
                    request.write(ndjson_line(line))
                    if pacer.paused:
                        await pacer.drained()
            except OProxyError as e:
                request.write(OLLAMA.stream_event(e))
            except defer.CancelledError:
                raise
            except Exception:
                log.failure("Native stream failed after it began")
                request.write(OLLAMA.stream_event(ServerError()))


def render_json(scope: Scope, payload: Any, status: int = 200) -> bytes:
    scope.request.setResponseCode(status)
    scope.request.setHeader(b"content-type", JSON_TYPE)
    return orjson.dumps(payload)
