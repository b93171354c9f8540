"""
Another API served through the chat path: OpenAI's Responses API and
Anthropic's Messages API each translate their request into a chat request,
whose routes answer it as they answer ``/v1/chat/completions``, and give a
:class:`~oproxy.api.answer.Shape` that turns the chat answer into theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from oproxy.api.answer import Chunks, Shape, answer
from oproxy.api.scope import Scope
from oproxy.routing.router import Route


async def answer_through_chat(
    scope: Scope,
    chat: Mapping[str, Any],
    model: str,
    routes: Sequence[Route],
    shape: Shape,
    *,
    stream: bool,
    image_urls: list[str],
    body_for: Callable[[Route], Mapping[str, Any]],
) -> bytes | None:
    """
    Answer ``chat``, the client's request translated, from the cache or
    the first of ``routes`` that answers, in the client's ``shape``.

    :param image_urls: the chat request's remote image URLs.
    :param body_for: the chat request as a route is sent it.
    """

    async def produce(route: Route) -> dict[str, Any]:
        call = await scope.call(route, image_urls, chat)
        return await route.backend.chat_completion(call, body_for(route))

    async def produce_stream(route: Route) -> Chunks:
        call = await scope.call(route, image_urls, chat)
        return await route.backend.chat_completion_stream(call, body_for(route))

    return await answer(
        scope,
        "chat",
        model,
        routes,
        stream=stream,
        produce=produce,
        produce_stream=produce_stream,
        body=chat,
        shape=shape,
    )
