"""
The models page's JSON and actions: every model of every backend, pull
with live progress, delete, load and unload.

What a backend can do is asked of its capabilities, never of its kind: a
backend that speaks Ollama's native API (:class:`INativeOllama`) lists its
models with their details (``/api/tags``) and what is loaded
(``/api/ps``); one that holds models clients may change
(:class:`IModelManagement`) pulls and deletes; one that loads and unloads
on request (:class:`IModelLoading`: Ollama, LM Studio) does so as
``/admin/models/load`` does.  Any other backend's models are what its
server says of them (:meth:`IBackend.describe_models`: LM Studio's type,
context length and loaded state, vLLM's context length...).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from fnmatch import fnmatchcase
from typing import Any

from twisted.internet import defer

from oproxy.api.admin_models import manage_loading
from oproxy.api.native import relay_ndjson
from oproxy.api.scope import Scope
from oproxy.backends.base import IBackend, IModelLoading, IModelManagement, INativeOllama, ModelInfo
from oproxy.config import ModelRule
from oproxy.errors import (
    InvalidRequest,
    NotFound,
    OProxyError,
    UpstreamError,
)
from oproxy.routing.catalog import name_forms
from oproxy.upstream import DeadlineExceeded, within

#: Seconds each backend has to list its models.
LISTING_SECONDS = 10.0
#: The longest model name taken (Ollama's own limit is well below).
NAME_MAX_LENGTH = 300

Progress = AsyncGenerator[dict[str, Any], None]


# -- the listing ----------------------------------------------------------------------


async def _native_get(scope: Scope, backend: INativeOllama, path: str) -> dict[str, Any]:
    status, body = await within(
        defer.Deferred.fromCoroutine(backend.upstream.request_json("GET", path)),
        LISTING_SECONDS,
        scope.services.clock,
    )
    if status != 200 or not isinstance(body, dict):
        message = body.get("error") if isinstance(body, dict) else None
        raise UpstreamError(f"{path} answered HTTP {status}" + (f": {message}" if message else ""))
    return body


async def _one_backend(scope: Scope, backend: IBackend) -> dict[str, Any]:
    """One backend's models, or why it could not say."""
    native = INativeOllama.providedBy(backend)
    entry: dict[str, Any] = {
        "name": backend.name,
        "kind": backend.kind,
        "can_pull": IModelManagement.providedBy(backend),
        "can_load": IModelLoading.providedBy(backend),
        "error": None,
        "models": [],
    }
    try:
        if native:
            ollama = INativeOllama(backend)
            tags, ps = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(_native_get(scope, ollama, "/api/tags")),
                    defer.Deferred.fromCoroutine(_native_get(scope, ollama, "/api/ps")),
                ],
                consumeErrors=True,
            )
            loaded = {
                (m.get("name") or m.get("model")): m
                for m in ps.get("models") or ()
                if isinstance(m, dict)
            }
            for model in tags.get("models") or ():
                if isinstance(model, dict):
                    entry["models"].append(_native_model(model, loaded))
        else:
            described = await within(
                defer.Deferred.fromCoroutine(backend.describe_models()),
                LISTING_SECONDS,
                scope.services.clock,
            )
            entry["models"].extend(_described_model(model) for model in described)
    except defer.FirstError as e:
        entry["error"] = _reason(e.subFailure.value or e)
    except (OProxyError, DeadlineExceeded) as e:
        entry["error"] = _reason(e)
    return entry


def _reason(error: BaseException) -> str:
    if isinstance(error, OProxyError):
        return error.message
    if isinstance(error, DeadlineExceeded):
        return f"no answer within {LISTING_SECONDS:g} seconds"
    return str(error) or type(error).__name__


def _native_model(model: dict[str, Any], loaded: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    name = model.get("name") or model.get("model")
    given = model.get("details")
    details: dict[str, Any] = given if isinstance(given, dict) else {}
    running = next((loaded[form] for form in name_forms(str(name)) if form in loaded), None)
    return {
        "name": name,
        "size": model.get("size"),
        "family": details.get("family"),
        "parameter_size": details.get("parameter_size"),
        "quantization": details.get("quantization_level"),
        "format": details.get("format"),
        "modified_at": model.get("modified_at"),
        "loaded": running is not None,
        "loaded_until": running.get("expires_at") if running else None,
        "size_vram": running.get("size_vram") if running else None,
    }


def _described_model(model: ModelInfo) -> dict[str, Any]:
    """A model as a server other than Ollama describes it, in the same columns."""
    return {
        "name": model.id,
        "size": model.size,
        "family": model.family,
        "parameter_size": model.parameters,
        "quantization": model.quantization,
        "type": model.kind,
        "context_length": model.context_length,
        "loaded": model.loaded,
    }


def _aliases_for(rules: Sequence[ModelRule], model: str, backend: str) -> list[str]:
    """The configured names that route to ``model`` on ``backend``."""
    forms = set(name_forms(model))
    return [
        rule.pattern
        for rule in rules
        if not rule.is_glob
        and rule.target is not None
        and rule.target in forms
        and (not rule.backends or any(fnmatchcase(backend, p) for p in rule.backends))
    ]


def _rule(rule: ModelRule) -> dict[str, Any]:
    return {
        "name": rule.pattern,
        "glob": rule.is_glob,
        "target": rule.target,
        "backends": list(rule.backends),
        "fallbacks": list(rule.fallbacks),
        "strategy": rule.strategy,
    }


async def listing(scope: Scope) -> bytes | None:
    """``GET /ui/api/models``: every backend's models, and the configured names."""
    router = scope.services.router
    backends = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(_one_backend(scope, b)) for b in router.backends]
    )
    rules = router.config.models
    models = []
    for backend in backends:
        for model in backend["models"]:
            models.append(
                {
                    **model,
                    "backend": backend["name"],
                    "aliases": _aliases_for(rules, str(model["name"]), backend["name"]),
                    "can_delete": backend["can_pull"],
                    "can_load": backend["can_load"],
                }
            )
    return scope.json(
        {
            "backends": [{k: v for k, v in b.items() if k != "models"} for b in backends],
            "models": models,
            "rules": [_rule(rule) for rule in rules],
        }
    )


# -- actions ---------------------------------------------------------------------------


def _model_name(scope: Scope) -> str:
    model = scope.body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("Type the name of a model, such as llama3.2:3b.", param="model")
    model = model.strip()
    if len(model) > NAME_MAX_LENGTH or any(c.isspace() for c in model):
        raise InvalidRequest(f"{model[:60]!r} is not a model name.", param="model")
    return model


def _managing_backend(scope: Scope) -> IModelManagement:
    """
    The backend the body names, able to pull and delete models; without a
    name, the only one that can.
    """
    able = [
        IModelManagement(backend)
        for backend in scope.services.router.backends
        if IModelManagement.providedBy(backend)
    ]
    named = scope.body.get("backend")
    if named:
        chosen = [b for b in able if b.name == named]
        if not chosen:
            raise InvalidRequest(
                f"No backend named {named!r} can pull and delete models.", param="backend"
            )
        return chosen[0]
    if len(able) == 1:
        return able[0]
    if not able:
        raise InvalidRequest("No backend can pull and delete models: only Ollama backends can.")
    raise InvalidRequest("Choose a backend.", param="backend")


def pull_message(model: str, error: str) -> str:
    """What a failed pull says, in words a reader of the page understands."""
    lowered = error.lower()
    if "file does not exist" in lowered or "not found" in lowered or "manifest unknown" in lowered:
        return f"The model {model!r} does not exist in the registry ({error})."
    return f"Pulling {model!r} failed: {error}"


async def pull(scope: Scope) -> bytes | None:
    """
    ``POST /ui/api/models/pull`` with ``{"model", "backend"}``: Ollama's
    progress, streamed as it comes (NDJSON), with the percentage of the
    layer being pulled and the bytes of all of them; the last line says
    ``success`` or the error.
    """
    model = _model_name(scope)
    backend = _managing_backend(scope)
    scope.backend_label = backend.name
    status, lines = await backend.upstream.stream_json_lines(
        "/api/pull", {"model": model, "stream": True}, scope.upstream_time
    )
    if status != 200:
        async with aclosing(lines):
            first = await anext(lines, None)
        message = first.get("error") if isinstance(first, dict) else None
        raise InvalidRequest(pull_message(model, str(message or f"HTTP {status}")), param="model")
    await relay_ndjson(scope, progress(scope, backend, model, lines))
    return None


async def progress(
    scope: Scope, backend: IModelManagement, model: str, lines: AsyncGenerator[Any, None]
) -> Progress:
    """Ollama's pull lines as the page shows them."""
    layers: dict[str, tuple[int, int]] = {}
    async with aclosing(lines):
        async for line in lines:
            if not isinstance(line, dict):
                continue
            if "error" in line:
                yield {"error": pull_message(model, str(line["error"])), "done": True}
                return
            status = str(line.get("status", ""))
            shown: dict[str, Any] = {"status": status, "done": False}
            total, completed = line.get("total"), line.get("completed", 0)
            digest = line.get("digest")
            if isinstance(digest, str) and isinstance(total, int) and total > 0:
                completed = completed if isinstance(completed, int) else 0
                layers[digest] = (min(completed, total), total)
                shown["percent"] = round(100.0 * completed / total, 1)
                shown["completed"], shown["total"] = completed, total
            if layers:
                shown["all_completed"] = sum(done for done, _ in layers.values())
                shown["all_total"] = sum(size for _, size in layers.values())
            if status == "success":
                await scope.services.router.state.catalog.refresh([backend])
                yield {**shown, "percent": 100.0, "done": True}
                return
            yield shown
    yield {"error": f"The pull of {model!r} ended without saying it succeeded.", "done": True}


async def delete(scope: Scope) -> bytes | None:
    """``POST /ui/api/models/delete`` with ``{"model", "backend"}``."""
    model = _model_name(scope)
    backend = _managing_backend(scope)
    scope.backend_label = backend.name
    status, answer = await backend.upstream.request_json(
        "DELETE", "/api/delete", {"model": model}, scope.upstream_time
    )
    if status == 404:
        raise NotFound(f"{backend.name} has no model {model!r}.")
    if status != 200:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise UpstreamError(f"{backend.name} did not delete {model!r}: {message or status}")
    await scope.services.router.state.catalog.refresh([backend])
    return scope.json({"deleted": model, "backend": backend.name})


async def load(scope: Scope) -> bytes | None:
    """``POST /ui/api/models/load``: as ``/admin/models/load``, for the signed-in admin."""
    return scope.json(await manage_loading(scope, "load"))


async def unload(scope: Scope) -> bytes | None:
    """``POST /ui/api/models/unload``: as ``/admin/models/unload``."""
    return scope.json(await manage_loading(scope, "unload"))
