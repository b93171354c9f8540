"""
``max-tokens-cap``: no generation longer than the operator allows.

On the generating routes, a request's ``max_tokens`` and
``max_completion_tokens`` (OpenAI) or ``options.num_predict`` (Ollama's
``/api/chat`` and ``/api/generate``) are lowered to the cap; a request that
gives none, or an unbounded one (Ollama's ``-1`` and ``-2``), gets the cap.
Per key or per model through the entry's ``keys:`` and ``models:`` (one
entry for each cap).  A value that is not a number is left for the route to
refuse.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from oproxy.config.values import Count
from oproxy.plugins.interface import JSON, Exchange, IRequestHook, PluginFactory, from_options

#: The OpenAI routes that generate, and the fields that bound them.
OPENAI_ROUTES = frozenset(("/v1/chat/completions", "/v1/completions"))
OPENAI_FIELDS = ("max_tokens", "max_completion_tokens")
#: Ollama's routes that generate (bounded by ``options.num_predict``).
OLLAMA_ROUTES = frozenset(("/api/chat", "/api/generate"))


@attrs.frozen
class MaxTokensCapOptions:
    """:ivar max_tokens: the most tokens one generation may have."""

    max_tokens: Count


def _number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@implementer(IRequestHook)
class MaxTokensCap:
    def __init__(self, options: MaxTokensCapOptions) -> None:
        self.cap = options.max_tokens

    def on_request(self, exchange: Exchange, body: JSON) -> None:
        cap = self.cap
        if exchange.route in OPENAI_ROUTES:
            given = [name for name in OPENAI_FIELDS if body.get(name) is not None]
            for name in given:
                if _number(body[name]) and body[name] > cap:
                    body[name] = cap
            if not given:
                body["max_tokens"] = cap
        elif exchange.route in OLLAMA_ROUTES:
            options = body.get("options")
            if options is None:
                options = body["options"] = {}
            if not isinstance(options, dict):
                return
            limit = options.get("num_predict")
            if limit is None or (_number(limit) and (limit < 0 or limit > cap)):
                options["num_predict"] = cap


factory = PluginFactory(
    "max-tokens-cap",
    from_options(MaxTokensCap),
    options=MaxTokensCapOptions,
    description="Cap max_tokens, max_completion_tokens and options.num_predict.",
)
