"""
``POST /v1/chat/completions``.
"""

from __future__ import annotations

from oproxy.api.scope import Scope
from oproxy.streaming import relay_sse
from oproxy.translate.chat import remote_image_urls


async def create(scope: Scope) -> bytes | None:
    model = scope.model()
    stream = scope.stream()
    route = scope.route(model)
    call = await scope.call(model, route, remote_image_urls(scope.body))
    if not stream:
        return scope.json(await route.backend.chat_completion(call, scope.body))
    chunks = await route.backend.chat_completion_stream(call, scope.body)
    await relay_sse(scope.request, chunks)
    return None
