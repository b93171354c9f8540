"""
What every upstream adapter offers the API layer.

The API layer speaks OpenAI on both sides of this line: an adapter takes an
OpenAI request body and returns OpenAI response objects (or an iterator of
stream chunks), whatever it has to say to its own server in between.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from oproxy.upstream import UpstreamTime


@dataclass(frozen=True)
class Call:
    """
    One request as routed: the names it needs and what the proxy fetched for it.

    :ivar client_model: the model name as the client sent it, echoed back.
    :ivar upstream_model: the name the backend knows the model by.
    :ivar created: the response's ``created`` timestamp (unix seconds).
    :ivar images: a chat's images made ready by the proxy, as base64, by URL:
        http(s) URLs fetched, data URLs in formats Ollama cannot read converted.
    :ivar upstream_time: where the backend adds the time it waited upstream.
    :ivar on_usage: told the token counts once the backend has given them,
        streams included, so that accounting never depends on the client
        asking for a usage chunk.
    :ivar on_cut_short: told how many completion tokens a stream generated
        when it ends without the backend's usage (the client left, or the
        backend failed midway), so that what was generated is still counted.
    """

    client_model: str
    upstream_model: str
    created: int
    images: Mapping[str, str] = field(default_factory=dict)
    on_usage: Callable[[Mapping[str, int]], None] = lambda usage: None
    on_cut_short: Callable[[int], None] = lambda generated: None
    upstream_time: UpstreamTime = field(default_factory=UpstreamTime)


class Backend(Protocol):
    """An upstream model server, seen through the OpenAI API."""

    #: ``ollama`` or ``openai``: what the server speaks natively.
    kind: str
    #: Its share of requests when several backends serve a model.
    weight: int

    @property
    def name(self) -> str: ...

    async def chat_completion(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def chat_completion_stream(
        self, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]: ...

    async def completion(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def completion_stream(
        self, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]: ...

    async def embeddings(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]: ...

    async def list_models(self) -> list[dict[str, Any]]: ...

    async def retrieve_model(self, model_id: str) -> dict[str, Any]: ...

    async def probe(self) -> dict[str, Any]:
        """
        A cheap health probe that never runs a completion: ``version``,
        ``models_available`` and ``models_loaded`` where the server tells.
        """
        ...
