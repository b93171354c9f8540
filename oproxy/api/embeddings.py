"""
``POST /v1/embeddings``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.caching import answer
from oproxy.api.scope import Scope
from oproxy.errors import InvalidRequest


async def create(scope: Scope) -> bytes | None:
    model = scope.model()
    route = scope.route(model)

    async def produce() -> dict[str, Any]:
        return await route.backend.embeddings(await scope.call(model, route), scope.body)

    async def produce_stream() -> AsyncGenerator[dict[str, Any], None]:
        raise InvalidRequest("embeddings cannot be streamed", param="stream")

    return await answer(
        scope,
        "embeddings",
        route,
        stream=False,
        produce=produce,
        produce_stream=produce_stream,
    )
