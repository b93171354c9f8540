"""
``POST /v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.caching import answer
from oproxy.api.scope import Scope
from oproxy.translate.chat import remote_image_urls


async def create(scope: Scope) -> bytes | None:
    model = scope.model()
    route = scope.route(model)

    async def produce() -> dict[str, Any]:
        call = await scope.call(model, route, remote_image_urls(scope.body))
        return await route.backend.chat_completion(call, scope.body)

    async def produce_stream() -> AsyncGenerator[dict[str, Any], None]:
        call = await scope.call(model, route, remote_image_urls(scope.body))
        return await route.backend.chat_completion_stream(call, scope.body)

    return await answer(
        scope, "chat", route, stream=scope.stream(), produce=produce, produce_stream=produce_stream
    )
