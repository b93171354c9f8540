"""
``POST /v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.caching import answer
from oproxy.api.scope import Scope
from oproxy.routing.router import Route
from oproxy.translate.chat import remote_image_urls


async def create(scope: Scope) -> bytes | None:
    model, routes = await scope.admitted_routes("chat")

    async def produce(route: Route) -> dict[str, Any]:
        call = await scope.call(route, remote_image_urls(scope.body))
        return await route.backend.chat_completion(call, route.body(scope.body))

    async def produce_stream(route: Route) -> AsyncGenerator[dict[str, Any], None]:
        call = await scope.call(route, remote_image_urls(scope.body))
        return await route.backend.chat_completion_stream(call, route.body(scope.body))

    return await answer(
        scope,
        "chat",
        model,
        routes,
        stream=scope.stream(),
        produce=produce,
        produce_stream=produce_stream,
    )
