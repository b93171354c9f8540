"""
``POST /v1/embeddings``.
"""

from __future__ import annotations

from oproxy.api.scope import Scope


async def create(scope: Scope) -> bytes | None:
    model = scope.model()
    route = scope.route(model)
    call = await scope.call(model, route)
    return scope.json(await route.backend.embeddings(call, scope.body))
