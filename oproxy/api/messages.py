"""
Anthropic's Messages API: ``POST /v1/messages`` and ``POST
/v1/messages/count_tokens``.

A message is made as a chat completion (:mod:`oproxy.translate.messages`
translates both ways), through the same admission, cache, routes and relay
as ``/v1/chat/completions``, so keys, limits, metrics, logs and the cache
apply as they do there.  Errors are Anthropic's (the route table names its
dialect), and the caller's oproxy key may come as ``x-api-key``, as
Anthropic's SDKs and Claude Code send it, or as ``Authorization: Bearer``.
The ``anthropic-version`` and ``anthropic-beta`` headers are accepted and
need not be sent: the API served is the one this server knows.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.answer import Shape
from oproxy.api.scope import Scope
from oproxy.api.through_chat import answer_through_chat
from oproxy.backends.base import IRuntimeOptions
from oproxy.errors import PermissionDenied
from oproxy.routing.router import Route
from oproxy.security.limits import estimate_prompt_tokens
from oproxy.streaming import Framing, typed_sse_event
from oproxy.translate import messages
from oproxy.translate.chat import remote_image_urls
from oproxy.web.dialects import ANTHROPIC

#: An Anthropic ``ping`` event: written while a model loads, where an
#: OpenAI stream gets an SSE comment (the SDKs skip both).
PING = typed_sse_event({"type": "ping"})

FRAMING = Framing(event=typed_sse_event, failure=ANTHROPIC.stream_event, ending=b"", keepalive=PING)


def _request_id(scope: Scope) -> None:
    """Anthropic's SDKs read the request's id from ``request-id``."""
    scope.request.setHeader(b"request-id", scope.request_id.encode("ascii"))


async def create(scope: Scope) -> bytes | None:
    _request_id(scope)
    scope.model()
    chat = messages.chat_request(scope.body)
    stream = scope.stream()
    model, routes = await scope.admitted_routes("chat", chat)
    stop_sequences = chat.get("stop") or []
    message_id = messages.new_message_id()
    image_urls = remote_image_urls(messages.chat_for_backend(chat, runtime_options=True))

    def for_route(route: Route) -> Any:
        return messages.chat_for_backend(
            route.body(chat), IRuntimeOptions.providedBy(route.backend)
        )

    async def render(completion: dict[str, Any]) -> dict[str, Any]:
        return messages.message_from_chat(
            completion, message_id=message_id, model=model, stop_sequences=stop_sequences
        )

    def events(
        chunks: AsyncGenerator[dict[str, Any], None],
    ) -> AsyncGenerator[dict[str, Any], None]:
        return messages.MessageStream(message_id, model, stop_sequences).events(chunks)

    return await answer_through_chat(
        scope,
        chat,
        model,
        routes,
        Shape(label="messages", render=render, events=events, framing=FRAMING),
        stream=stream,
        image_urls=image_urls,
        body_for=for_route,
    )


async def count_tokens(scope: Scope) -> bytes | None:
    """
    An estimate of the request's input tokens: the guard's own (text
    characters / 4, a fixed share per image), the same guess rate limits
    reserve by.  No backend is asked, and nothing is charged.
    """
    _request_id(scope)
    model = scope.model()
    chat = messages.chat_request(scope.body, counting=True)
    if not scope.may_use(model):
        raise PermissionDenied(
            f"This API key may not use the model '{model}'.",
            param="model",
            code="model_not_allowed",
        )
    return scope.json({"input_tokens": estimate_prompt_tokens("chat", chat)})
