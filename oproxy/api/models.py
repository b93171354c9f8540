"""
``GET /v1/models`` and ``GET /v1/models/{model}``.
"""

from __future__ import annotations

from urllib.parse import unquote

from oproxy.api.scope import Scope


async def list_all(scope: Scope) -> bytes | None:
    data = []
    seen = set()
    for backend in scope.router.backends:
        for model in await backend.list_models():
            if model["id"] not in seen:
                seen.add(model["id"])
                data.append(model)
    return scope.json({"object": "list", "data": data})


async def retrieve(scope: Scope, model_id: str) -> bytes | None:
    """
    Look one model up; ids may hold ``:`` and ``/``, raw or percent-encoded.
    """
    model_id = unquote(model_id)
    route = scope.route(model_id)
    return scope.json(await route.backend.retrieve_model(route.upstream_model))
