"""
``POST /v1/completions``: the legacy text completions API.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.caching import answer
from oproxy.api.scope import Scope


async def create(scope: Scope) -> bytes | None:
    model = scope.model()
    route = scope.route(model)

    async def produce() -> dict[str, Any]:
        return await route.backend.completion(await scope.call(model, route), scope.body)

    async def produce_stream() -> AsyncGenerator[dict[str, Any], None]:
        return await route.backend.completion_stream(await scope.call(model, route), scope.body)

    return await answer(
        scope,
        "completions",
        route,
        stream=scope.stream(),
        produce=produce,
        produce_stream=produce_stream,
    )
