"""
``POST /v1/completions``: the legacy text completions API.
"""

from __future__ import annotations

from oproxy.api.scope import Scope
from oproxy.streaming import relay_sse


async def create(scope: Scope) -> bytes | None:
    model = scope.model()
    stream = scope.stream()
    route = scope.route(model)
    call = await scope.call(model, route)
    if not stream:
        return scope.json(await route.backend.completion(call, scope.body))
    chunks = await route.backend.completion_stream(call, scope.body)
    await relay_sse(scope.request, chunks)
    return None
