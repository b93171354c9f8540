"""
``POST /v1/embeddings``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.answer import answer
from oproxy.api.scope import Scope
from oproxy.errors import InvalidRequest
from oproxy.routing.router import Route


async def create(scope: Scope) -> bytes | None:
    model, routes = await scope.admitted_routes("embeddings")

    async def produce(route: Route) -> dict[str, Any]:
        return await route.backend.embeddings(await scope.call(route), route.body(scope.body))

    async def produce_stream(route: Route) -> AsyncGenerator[dict[str, Any], None]:
        raise InvalidRequest("embeddings cannot be streamed", param="stream")

    return await answer(
        scope,
        "embeddings",
        model,
        routes,
        stream=False,
        produce=produce,
        produce_stream=produce_stream,
    )
