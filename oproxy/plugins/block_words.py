"""
``block-words``: refuse requests that mention what must not be asked.

Every text of the request (messages, prompts, inputs, system prompts) is
searched for the configured words or phrases (whole words, any case; or
regular expressions with ``regex: true``).  A match refuses the request
with a 400 before anything is routed: OpenAI's error object with code
``content_blocked`` (Ollama's ``{"error": ...}`` on the native routes).
The refusal does not say what matched.
"""

from __future__ import annotations

from typing import Any

import attrs
import regex
from zope.interface import implementer

from oproxy.config.values import ConfigError
from oproxy.errors import InvalidRequest
from oproxy.plugins.interface import JSON, Exchange, IRequestHook, PluginFactory, from_options
from oproxy.plugins.texts import request_texts

#: The error code of a refusal.
CODE = "content_blocked"


@attrs.frozen
class BlockWordsOptions:
    """
    :ivar patterns: words or phrases (or, with ``regex``, regular
        expressions) that refuse a request.
    :ivar regex: read the patterns as regular expressions (still any case).
    :ivar message: what the refused client is told.
    """

    patterns: tuple[str, ...]
    regex: bool = False
    message: str = "The request was refused: it mentions a blocked topic."

    def __attrs_post_init__(self) -> None:
        if not self.patterns:
            raise ConfigError("patterns", "must list at least one word or pattern")
        for index, pattern in enumerate(self.patterns):
            try:
                regex.compile(_rule(pattern, self.regex))
            except regex.error as e:
                raise ConfigError(
                    f"patterns[{index}]", f"must be a regular expression ({e})"
                ) from None


def _rule(pattern: str, as_regex: bool) -> str:
    if as_regex:
        return pattern
    # Whole words: not inside a longer word, whatever the phrase begins or ends with.
    return r"(?<!\w)" + regex.escape(pattern) + r"(?!\w)"


@implementer(IRequestHook)
class BlockWords:
    def __init__(self, options: BlockWordsOptions) -> None:
        self._rules = [
            regex.compile(_rule(p, options.regex), regex.IGNORECASE) for p in options.patterns
        ]
        self._message = options.message

    def matching_rule(self, body: JSON) -> int | None:
        """The index of the first pattern a text of ``body`` matches."""
        texts: list[Any] = [container[key] for container, key in request_texts(body)]
        for index, rule in enumerate(self._rules):
            if any(rule.search(text) for text in texts):
                return index
        return None

    def on_request(self, exchange: Exchange, body: JSON) -> None:
        rule = self.matching_rule(body)
        if rule is not None:
            raise InvalidRequest(self._message, code=CODE)


factory = PluginFactory(
    "block-words",
    from_options(BlockWords),
    options=BlockWordsOptions,
    description="Refuse requests that mention blocked words or patterns (400 content_blocked).",
)
