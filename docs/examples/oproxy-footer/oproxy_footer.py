"""
``footer``: a line of the operator's at the end of every chat answer,
whole or streamed, on the OpenAI routes and Ollama's.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from oproxy.plugins.interface import (
    Environment,
    Exchange,
    IChunkHook,
    IResponseHook,
    PluginFactory,
)


@attrs.frozen
class FooterOptions:
    """What ``config:`` may say: read strictly, like the rest of the file."""

    text: str = "Answered through oproxy."


@implementer(IResponseHook, IChunkHook)
class Footer:
    def __init__(self, options: FooterOptions) -> None:
        self.line = "\n\n" + options.text

    def on_response(self, exchange: Exchange, answer: dict[str, Any]) -> None:
        """A whole answer: OpenAI's choices, or Ollama's one message."""
        if exchange.api == "openai":
            messages = [choice.get("message") for choice in answer.get("choices", [])]
        else:
            messages = [answer.get("message")]
        for message in messages:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] += self.line

    def on_chunk(self, exchange: Exchange, chunk: dict[str, Any] | None) -> None:
        """A stream: the line goes into the chunk that ends each answer."""
        if chunk is None:  # the stream is over: nothing was held back
            return
        if exchange.api == "openai":
            for choice in chunk.get("choices", []):
                if choice.get("finish_reason") is not None:
                    delta = choice.setdefault("delta", {})
                    delta["content"] = (delta.get("content") or "") + self.line
        elif chunk.get("done") is True and isinstance(chunk.get("message"), dict):
            chunk["message"]["content"] = chunk["message"].get("content", "") + self.line


def build(options: FooterOptions, environment: Environment) -> Footer:
    return Footer(options)


factory = PluginFactory(
    "footer",
    build,
    options=FooterOptions,
    description="A line of your own at the end of every chat answer.",
)
