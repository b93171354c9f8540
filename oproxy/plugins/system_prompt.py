"""
``system-prompt``: a system message of the operator's in every conversation.

Put before the conversation (``position: prepend``, the default) or after
it (``append``), on the chat routes (``/v1/chat/completions``,
``/api/chat``); on Ollama's ``/api/generate`` it goes into the ``system``
field (before or after the one the client sent).  Other routes are left
alone.  Per key or per model through the entry's ``keys:`` and ``models:``.
"""

from __future__ import annotations

from typing import Annotated

import attrs
from zope.interface import implementer

from oproxy.config.values import one_of
from oproxy.plugins.interface import JSON, Exchange, IRequestHook, PluginFactory, from_options

POSITIONS = ("prepend", "append")


@attrs.frozen
class SystemPromptOptions:
    """
    :ivar text: the system message.
    :ivar position: ``prepend`` (first message) or ``append`` (last).
    """

    text: str
    position: Annotated[str, one_of(*POSITIONS)] = "prepend"


@implementer(IRequestHook)
class SystemPrompt:
    def __init__(self, options: SystemPromptOptions) -> None:
        self.text = options.text
        self.first = options.position == "prepend"

    def on_request(self, exchange: Exchange, body: JSON) -> None:
        messages = body.get("messages")
        if isinstance(messages, list):
            message = {"role": "system", "content": self.text}
            if self.first:
                messages.insert(0, message)
            else:
                messages.append(message)
        elif exchange.route == "/api/generate":
            given = body.get("system")
            if not isinstance(given, str) or not given:
                body["system"] = self.text
            else:
                parts = (self.text, given) if self.first else (given, self.text)
                body["system"] = "\n\n".join(parts)


factory = PluginFactory(
    "system-prompt",
    from_options(SystemPrompt),
    options=SystemPromptOptions,
    description="Add a system message to every conversation.",
)
