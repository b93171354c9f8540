"""
Ollama's native model routes: what is installed, loaded and running
(``/api/tags``, ``/api/ps``, ``/api/version``, ``/``), and model
management (``/api/pull``, ``/api/push``, ``/api/create``,
``/api/delete``, ``/api/copy``).

Listings are the union over the healthy Ollama backends, filtered by what
the caller's key may use, so a model picker shows exactly what the key can
run.  Management changes what a backend holds, so only admin keys may do
it; it goes to the backend the ``x-oproxy-backend`` header names, else to
the only Ollama backend, else to every Ollama backend the model's rule
allows, one after the other.  The router's model lists are refreshed
after a change, so the next request finds (or no longer finds) the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import aclosing
from fnmatch import fnmatchcase
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import Request

from oproxy import __version__
from oproxy.api.admin import require_admin
from oproxy.api.native import (
    Lines,
    relay_ndjson,
    render_json,
    requested_model,
    streams,
    verbatim_error,
)
from oproxy.api.scope import Scope
from oproxy.backends.base import IModelManagement, INativeOllama
from oproxy.errors import InvalidRequest, OProxyError, UpstreamUnavailable
from oproxy.routing.catalog import name_forms
from oproxy.upstream import DeadlineExceeded, within

log = Logger()

#: Seconds a listing waits for each backend: one slow server must not hold
#: up a model picker that asks every few seconds.
LISTING_SECONDS = 10.0

#: The request header that picks the backend a management request goes to.
BACKEND_HEADER = b"x-oproxy-backend"


def ollama_backends(scope: Scope, *, healthy: bool = True) -> list[INativeOllama]:
    """
    The backends that speak Ollama's native API, without those whose
    circuit is open (unless asked).
    """
    breaker = scope.services.router.state.breaker
    return [
        INativeOllama(backend)
        for backend in scope.services.router.backends
        if INativeOllama.providedBy(backend) and not (healthy and breaker.is_open(backend.name))
    ]


# -- listings -------------------------------------------------------------------------


async def _get(scope: Scope, backend: INativeOllama, path: str) -> dict[str, Any] | None:
    """One backend's answer to a ``GET``, or ``None`` if it has none to give now."""
    try:
        status, body = await within(
            defer.Deferred.fromCoroutine(backend.upstream.request_json("GET", path)),
            LISTING_SECONDS,
            scope.services.clock,
        )
    except (OProxyError, DeadlineExceeded) as e:
        log.info(
            "Backend {backend} did not answer {path}: {reason}",
            backend=backend.name,
            path=path,
            reason=str(e) or type(e).__name__,
        )
        return None
    return body if status == 200 and isinstance(body, dict) else None


async def _union(scope: Scope, path: str) -> dict[str, dict[str, Any]]:
    """
    Every healthy Ollama backend's ``models`` under ``path``, by name; when
    several list a name, the first backend's entry wins.
    """
    answers = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(_get(scope, b, path)) for b in ollama_backends(scope)]
    )
    listed: dict[str, dict[str, Any]] = {}
    for answer in answers:
        for entry in (answer or {}).get("models") or ():
            name = (entry.get("name") or entry.get("model")) if isinstance(entry, dict) else None
            if isinstance(name, str) and name not in listed:
                listed[name] = entry
    return listed


async def tags(scope: Scope) -> bytes | None:
    """
    ``GET /api/tags``: every backend's models, and the configured aliases as
    copies of their target's entry, as far as the caller's key may use them.
    """
    listed = await _union(scope, "/api/tags")
    for rule in scope.services.router.config.models:
        if rule.is_glob or rule.target is None or rule.pattern in listed:
            continue
        target = next((listed[f] for f in name_forms(rule.target) if f in listed), None)
        if target is not None:
            listed[rule.pattern] = {**target, "name": rule.pattern, "model": rule.pattern}
    models = [entry for name, entry in listed.items() if scope.may_use(name)]
    return render_json(scope, {"models": models})


async def ps(scope: Scope) -> bytes | None:
    """``GET /api/ps``: the models loaded anywhere, as far as the key may use them."""
    listed = await _union(scope, "/api/ps")
    return render_json(scope, {"models": [e for n, e in listed.items() if scope.may_use(n)]})


async def version(scope: Scope) -> bytes | None:
    """
    ``GET /api/version``: the first reachable Ollama backend's, since clients
    gate features on it.
    """
    for backend in ollama_backends(scope, healthy=False):
        answer = await _get(scope, backend, "/api/version")
        if answer is not None and isinstance(answer.get("version"), str):
            scope.backend_label = backend.name
            return render_json(scope, {"version": answer["version"]})
    raise UpstreamUnavailable("no Ollama backend answered")


async def banner(scope: Scope) -> bytes | None:
    """
    ``GET /``: ``Ollama is running``, which Ollama clients look for, unless
    the client asks for JSON, which gets oproxy's own description.
    """
    accept = scope.request.getHeader(b"accept") or b""
    if b"application/json" in accept.lower():
        return render_json(scope, {"name": "oproxy", "version": __version__, "api": "/v1"})
    scope.request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"Ollama is running"


# -- management -----------------------------------------------------------------------


def managed_backends(scope: Scope, model: str) -> list[IModelManagement]:
    """
    Where a management request goes: the backend the client names, else the
    only Ollama backend, else every one the model's rule allows.
    """
    everyone = [
        IModelManagement(backend)
        for backend in scope.services.router.backends
        if IModelManagement.providedBy(backend)
    ]
    named = scope.request.getHeader(BACKEND_HEADER)
    if named is not None:
        name = named.decode("utf-8", "replace")
        chosen = [b for b in everyone if b.name == name]
        if not chosen:
            raise InvalidRequest(f"x-oproxy-backend names no Ollama backend: {name!r}")
        return chosen
    if len(everyone) <= 1:
        if not everyone:
            raise InvalidRequest("no Ollama backend is configured")
        return everyone
    rule = scope.services.router.config.rule_for(model)
    patterns = rule.backends if rule is not None else ()
    allowed = [b for b in everyone if not patterns or any(fnmatchcase(b.name, p) for p in patterns)]
    if not allowed:
        raise InvalidRequest(f"no Ollama backend may hold the model {model!r}")
    return allowed


async def pull(scope: Scope) -> bytes | None:
    return await _progress(scope, "/api/pull", refresh=True)


async def push(scope: Scope) -> bytes | None:
    return await _progress(scope, "/api/push", refresh=False)


async def create(scope: Scope) -> bytes | None:
    return await _progress(scope, "/api/create", refresh=True)


async def _progress(scope: Scope, path: str, *, refresh: bool) -> bytes | None:
    """
    A long operation that reports progress: streamed by default, as Ollama
    does; over several backends, each one's progress in turn, the last
    line being the last backend's.
    """
    require_admin(scope)
    model = requested_model(scope, legacy=True)
    backends = managed_backends(scope, model)
    body = dict(scope.body)
    if streams(scope):
        lines = _each_progress(scope, backends, path, body, refresh=refresh)
        await relay_ndjson(scope, lines)
        return None
    answer: Any = None
    done: list[IModelManagement] = []
    try:
        for backend in backends:
            scope.backend_label = backend.name
            status, answer = await backend.upstream.request_json(
                "POST", path, body, scope.upstream_time
            )
            if status != 200:
                raise verbatim_error(status, answer, backend.name)
            done.append(backend)
    finally:
        if refresh and done:
            await scope.services.router.state.catalog.refresh(done)
    if scope.hooks is not None and isinstance(answer, dict):
        answer = await scope.hooks.response(answer)
    return render_json(scope, answer)


async def _each_progress(
    scope: Scope,
    backends: Sequence[IModelManagement],
    path: str,
    body: dict[str, Any],
    *,
    refresh: bool,
) -> Lines:
    """
    Every backend's progress lines, one backend after the other.  A backend
    that fails (an error answer, or an ``{"error": ...}`` line) ends the
    stream: the error is its last line, as Ollama ends a failed pull.
    """
    finished: list[IModelManagement] = []
    refreshed = False
    try:
        for backend in backends:
            scope.backend_label = backend.name
            status, lines = await backend.upstream.stream_json_lines(
                path, body, scope.upstream_time
            )
            if status != 200:
                async with aclosing(lines):
                    error = await anext(lines, None)
                raise verbatim_error(status, error, backend.name)
            failed = False
            async with aclosing(lines):
                async for line in lines:
                    if isinstance(line, dict):
                        failed = failed or "error" in line
                        yield line
            if failed:
                break
            finished.append(backend)
        if refresh and finished:
            await scope.services.router.state.catalog.refresh(finished)
        refreshed = True
    finally:
        if refresh and finished and not refreshed:
            # The stream was cut short: refresh what changed in the background.
            defer.Deferred.fromCoroutine(scope.services.router.state.catalog.refresh(finished))


async def delete(scope: Scope) -> bytes | None:
    """``DELETE /api/delete``: from every chosen backend that has the model."""
    require_admin(scope)
    model = requested_model(scope, legacy=True)
    return await _on_each(scope, "DELETE", "/api/delete", managed_backends(scope, model))


async def copy(scope: Scope) -> bytes | None:
    """``POST /api/copy``: on every chosen backend that has the source."""
    require_admin(scope)
    source = scope.body.get("source")
    backends = managed_backends(scope, source if isinstance(source, str) else "")
    return await _on_each(scope, "POST", "/api/copy", backends)


async def _on_each(
    scope: Scope, method: str, path: str, backends: Sequence[IModelManagement]
) -> bytes | None:
    """
    Send the request to each backend; a backend that lacks the model is
    passed over while another had it.  Ollama answers success with an empty
    body, and so does this.
    """
    done: list[IModelManagement] = []
    missing: OProxyError | None = None
    for backend in backends:
        scope.backend_label = backend.name
        status, answer = await backend.upstream.request_json(
            method, path, scope.body, scope.upstream_time
        )
        if status == 200:
            done.append(backend)
        elif status == 404 and len(backends) > 1:
            missing = verbatim_error(status, answer, backend.name)
        else:
            raise verbatim_error(status, answer, backend.name)
    if not done and missing is not None:
        raise missing
    await scope.services.router.state.catalog.refresh(done)
    scope.request.setResponseCode(200)
    if isinstance(scope.request, Request):
        scope.request.defaultContentType = None  # nothing to label, as Ollama
    return b""
