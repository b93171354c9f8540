"""
``POST /v1/completions``: the legacy text completions API.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.caching import answer
from oproxy.api.scope import Scope
from oproxy.routing.router import Route


async def create(scope: Scope) -> bytes | None:
    model, routes = await scope.admitted_routes("completions")

    async def produce(route: Route) -> dict[str, Any]:
        return await route.backend.completion(await scope.call(route), route.body(scope.body))

    async def produce_stream(route: Route) -> AsyncGenerator[dict[str, Any], None]:
        call = await scope.call(route)
        return await route.backend.completion_stream(call, route.body(scope.body))

    return await answer(
        scope,
        "completions",
        model,
        routes,
        stream=scope.stream(),
        produce=produce,
        produce_stream=produce_stream,
    )
