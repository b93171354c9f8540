"""
``/admin/models/load`` and ``/admin/models/unload``: put a model into a
backend's memory before the first request needs it, or take it out, on
the backends that can (:class:`~oproxy.backends.base.IModelLoading`: LM
Studio, Ollama).  Admin keys only.

The body names the model as clients do (an alias is followed to its
target) and, optionally, one backend; without one, every backend that can
load models and lists this one does it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from oproxy.api.admin import require_admin
from oproxy.api.scope import Scope
from oproxy.backends.base import IModelLoading
from oproxy.errors import InvalidRequest, ModelNotFound


async def load(scope: Scope) -> bytes | None:
    """``POST /admin/models/load`` with ``{"model": ..., "backend": ...}``."""
    require_admin(scope)
    return scope.json(await manage_loading(scope, "load"))


async def unload(scope: Scope) -> bytes | None:
    """``POST /admin/models/unload`` with ``{"model": ..., "backend": ...}``."""
    require_admin(scope)
    return scope.json(await manage_loading(scope, "unload"))


async def manage_loading(scope: Scope, action: str) -> dict[str, Any]:
    """
    Load or unload the body's model where it can be; what was done.  The
    caller is an admin (a key here, a console session there).
    """
    model, backend_name = _named(scope.body)
    router = scope.services.router
    rule = router.config.rule_for(model)
    target = (rule.target if rule and rule.target else None) or model
    backends = [b for b in router.backends if backend_name in (None, b.name)]
    if backend_name is not None and not backends:
        raise InvalidRequest(f"No backend is named {backend_name!r}.", param="backend")
    able = [IModelLoading(b) for b in backends if IModelLoading.providedBy(b)]
    if not able:
        where = f"backend {backend_name!r}" if backend_name else "no configured backend"
        raise InvalidRequest(
            f"{where} can load and unload models on request "
            "(LM Studio and Ollama backends can).".capitalize(),
            param="backend",
            code="unsupported_backend",
        )
    catalog = router.state.catalog
    await catalog.refresh(able)
    serving = [b for b in able if catalog.serves(b.name, target)]
    if not serving:
        raise ModelNotFound(model)

    async def one(backend: IModelLoading) -> None:
        if action == "load":
            await backend.load_model(target)
            catalog.mark_loaded(backend.name, target)
        else:
            await backend.unload_model(target)
            catalog.mark_unloaded(backend.name, target)

    try:
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(b)) for b in serving], consumeErrors=True
        )
    except defer.FirstError as e:
        e.subFailure.raiseException()
    return {
        "object": "model.action",
        "action": action,
        "model": model,
        "backends": [b.name for b in serving],
    }


def _named(body: Any) -> tuple[str, str | None]:
    """The body's ``model`` and optional ``backend``."""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a model name", param="model", code="invalid_value")
    backend = body.get("backend")
    if backend is not None and (not isinstance(backend, str) or not backend):
        raise InvalidRequest("backend must be a backend name", param="backend")
    return model, backend
