"""
Ollama's native API (``/api/*``), for the clients that speak it.

Open WebUI, the ``ollama`` Python and JavaScript libraries and many editors
talk to Ollama, not to OpenAI.  Served here, they get the same keys, model
permissions, limits, routing, metrics and access log as the OpenAI routes,
and see an Ollama: bodies pass through as Ollama defines them, answers come
back as Ollama frames them (NDJSON streams by default), and errors are
Ollama's ``{"error": "..."}``.  Only the model name is touched: an alias
goes upstream as its target and comes back as the alias, and a model's
configured defaults are merged under the client's ``options``.

Listings and model management live in :mod:`oproxy.api.native_models`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any, cast

import orjson
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from oproxy.api.dispatch import first_answer, first_stream
from oproxy.api.scope import Scope
from oproxy.backends.ollama import OllamaBackend, ollama_error
from oproxy.errors import (
    InvalidRequest,
    ModelNotFound,
    OProxyError,
    ServerError,
    UpstreamBusy,
    UpstreamError,
)
from oproxy.routing.router import Route
from oproxy.streaming import ClientPacer

log = Logger()

Lines = AsyncGenerator[dict[str, Any], None]

#: What Ollama (gin) labels its JSON answers and errors with.
JSON_TYPE = b"application/json; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"

#: Rule options that are not Ollama ``options`` keys, and where they go.
_TOP_LEVEL = frozenset(("keep_alive",))
_AS_NUM_PREDICT = frozenset(("max_tokens", "max_completion_tokens"))
_NOT_OLLAMA = frozenset(("reasoning_effort",))


# -- errors, the way Ollama says them ---------------------------------------------


class Answered(OProxyError):
    """
    An error answer from an Ollama backend, kept as it was: a native client
    gets Ollama's own status and message, as if it had asked Ollama.

    The subclasses place it in the hierarchy, so that dispatch still moves
    on to another backend after a 5xx, and the OpenAI rendering (if it is
    ever used) still makes sense.
    """

    def __init__(self, status: int, message: str, backend: str) -> None:
        super().__init__(f"backend {backend!r} answered HTTP {status}: {message}")
        self.answered_status = status
        self.answered_message = message


class AnsweredRefusal(Answered, InvalidRequest):
    """A 4xx: the request's fault, which another backend would repeat."""


class AnsweredBusy(Answered, UpstreamBusy):
    """A 429 or 503: this backend is overloaded, another may not be."""


class AnsweredFailure(Answered, UpstreamError):
    """A 5xx: this backend failed, another may not."""


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


def native_message(error: OProxyError) -> tuple[int, str]:
    """The status and message Ollama would have answered ``error`` with."""
    if isinstance(error, Answered):
        return error.answered_status, error.answered_message
    if isinstance(error, ModelNotFound):
        return error.status, f"model '{error.model}' not found"
    return error.status, error.message


def render_error(request: IRequest, error: OProxyError) -> bytes:
    """
    ``{"error": "..."}``, as Ollama answers: its clients read nothing else
    (the ``ollama`` library raises ``ResponseError`` with that message).
    Headers such as ``Retry-After`` are kept.
    """
    status, message = native_message(error)
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    for name, value in error.headers.items():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return orjson.dumps({"error": message})


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
    """Only an Ollama backend speaks the native API."""
    kept = [route for route in routes if isinstance(route.backend, OllamaBackend)]
    if not kept:
        raise ModelNotFound(model)
    return kept


def _backend(route: Route) -> OllamaBackend:
    return cast(OllamaBackend, route.backend)


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
        await scope.app.images.prepare_native(scope.body, scope.config.images)
    inference = path != "/api/show"
    if stream:

        async def open_lines(route: Route) -> Lines:
            status, lines = await _backend(route).upstream.stream_json_lines(
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
        status, answer = await _backend(route).upstream.request_json(
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
    scope.app.metrics.count_tokens(usage, model=route.client_model, key=scope.key_name)


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
            scope.app.metrics.count_tokens(
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
    The client's socket paces the relay, and a client that leaves cancels
    it, which closes the upstream connection: the model stops generating.

    :param route_name: the route to note the time to the first token for,
        when the lines are tokens.
    """
    request = scope.request
    async with aclosing(lines):
        first = await anext(lines, None)
        if first is None:
            raise UpstreamError("the backend sent an empty stream")
        request.setHeader(b"content-type", NDJSON_TYPE)
        if route_name is not None:
            scope.first_token_seconds = scope.app.clock.seconds() - scope.started
            scope.app.metrics.first_token.labels(route_name, scope.model_label).observe(
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
                request.write(ndjson_line({"error": native_message(e)[1]}))
            except defer.CancelledError:
                raise
            except Exception:
                log.failure("Native stream failed after it began")
                request.write(ndjson_line({"error": ServerError().message}))


def render_json(scope: Scope, payload: Any, status: int = 200) -> bytes:
    scope.request.setResponseCode(status)
    scope.request.setHeader(b"content-type", JSON_TYPE)
    return orjson.dumps(payload)
