"""
Hugging Face text-generation-inference (``type: tgi``): one model, its
OpenAI chat and completions routes.

* The model is the one ``GET /info`` names (``model_id``), with
  ``max_input_tokens``, ``max_total_tokens`` and the router's ``version``;
  ``GET /health`` answers 200 with an empty body, 503 ``{"error":
  "unhealthy", "error_type": "healthcheck"}`` when the shard is down.
* How busy it is: ``tgi_queue_size`` (waiting) and
  ``tgi_batch_current_size`` (running) on its ``/metrics``
  (:class:`IBusyness`).
* Requests, read by TGI's ``ChatRequest``: ``max_completion_tokens`` is an
  alias of ``max_tokens`` and both at once is a 422 ("duplicate field"),
  so one is sent; ``logit_bias`` must be a list (it is unused, and OpenAI's
  map is a 422), so it is dropped; ``response_format`` is TGI's own
  tagged shape (``{"type": "json_schema", "value": {...}}``), translated
  (:func:`~oproxy.backends.shaping.tgi_response_format`).  Errors are
  ``{"error": "...", "error_type": "validation"}`` with 422, 424
  (generation failed) or 429 (overloaded); a failure mid-stream is an
  event of that shape.  A whole chat answer's ``id`` is empty; the proxy
  gives it one.  Streamed tool calls repeat the role, the call's ``id``
  and the function's ``name`` in every delta; the proxy sends them once,
  as OpenAI does (:func:`once_per_call`).  TGI has no embeddings.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from zope.interface import implementer

from oproxy.backends.base import IBusyness, Load, ModelInfo
from oproxy.backends.openai import OpenAIBackend, whole_number
from oproxy.backends.prometheus import gauge_load
from oproxy.backends.shaping import max_tokens_only, tgi_response_format, without
from oproxy.backends.unserved import refused
from oproxy.errors import UpstreamError

QUEUE = "tgi_queue_size"
BATCH = "tgi_batch_current_size"


def info_model(info: Any, owned_by: str, name_field: str = "model_id") -> dict[str, Any]:
    """
    The one model an ``/info`` names, as an OpenAI model object with the
    limits ``/info`` gives beside it.

    :raises UpstreamError: for an ``/info`` without the model's name.
    """
    name = info.get(name_field) if isinstance(info, Mapping) else None
    if not isinstance(name, str) or not name:
        name = info.get("model_id") if isinstance(info, Mapping) else None
    if not isinstance(name, str) or not name:
        raise UpstreamError(f"backend {owned_by!r} did not name its model in /info")
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by}


async def once_per_call(
    chunks: AsyncGenerator[dict[str, Any], None],
) -> AsyncGenerator[dict[str, Any], None]:
    """
    TGI's streamed tool calls as OpenAI streams them: the role, a call's
    ``id``, ``type`` and function ``name`` in its first delta only.  TGI
    repeats them in every delta, and a client that adds deltas up (the
    OpenAI SDK's stream helpers concatenate strings) would read
    ``get_weatherget_weather...``.
    """
    roles: set[int] = set()
    calls: set[tuple[int, int]] = set()
    async with aclosing(chunks):
        async for chunk in chunks:
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if not isinstance(delta, dict):
                    continue
                number = choice.get("index", 0)
                if "role" in delta:
                    if number in roles:
                        del delta["role"]
                    roles.add(number)
                for call in delta.get("tool_calls") or ():
                    key = (number, call.get("index", 0))
                    if key not in calls:
                        calls.add(key)
                        continue
                    call.pop("id", None)
                    call.pop("type", None)
                    function = call.get("function")
                    if isinstance(function, dict):
                        function.pop("name", None)
            yield chunk


@implementer(IBusyness)
class TGIBackend(OpenAIBackend):
    """A text-generation-inference router."""

    def adapt(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        shaped = max_tokens_only(payload)
        if isinstance(shaped.get("logit_bias"), dict):
            shaped = without(shaped, "logit_bias")
        if "response_format" in shaped and path == "/chat/completions":
            translated = tgi_response_format(shaped["response_format"])
            shaped = without(shaped, "response_format")
            if translated is not None:
                shaped["response_format"] = translated
        return shaped

    def adapt_answer(self, path: str, answer: dict[str, Any]) -> None:
        if not answer.get("id"):
            prefix = "chatcmpl-" if path == "/chat/completions" else "cmpl-"
            answer["id"] = prefix + secrets.token_hex(12)

    def adapt_stream(
        self, chunks: AsyncGenerator[dict[str, Any], None]
    ) -> AsyncGenerator[dict[str, Any], None]:
        return once_per_call(chunks)

    embeddings = refused("text-generation-inference", "embeddings")

    async def _info(self) -> dict[str, Any]:
        info = await self.get_json(self._root + "/info")
        return info if isinstance(info, dict) else {}

    async def list_models(self) -> list[dict[str, Any]]:
        info = await self._info()
        model = info_model(info, self.name)
        model["max_input_tokens"] = whole_number(info.get("max_input_tokens"))
        model["max_total_tokens"] = whole_number(info.get("max_total_tokens"))
        return [model]

    async def probe(self) -> dict[str, Any]:
        """``/health``, then ``/info`` for the model and version."""
        await self.get_json(self._health)
        info = await self._info()
        model = info_model(info, self.name)["id"]
        return {
            "version": info.get("version"),
            "models_available": 1,
            "models_loaded": [model],
            "details": {
                "max_total_tokens": whole_number(info.get("max_total_tokens")),
                "max_concurrent_requests": whole_number(info.get("max_concurrent_requests")),
            },
        }

    async def describe_models(self) -> list[ModelInfo]:
        info = await self._info()
        return [
            ModelInfo(
                id=info_model(info, self.name)["id"],
                kind="llm",
                context_length=whole_number(info.get("max_total_tokens")),
                loaded=True,
            )
        ]

    async def load(self) -> Load:
        return gauge_load(await self.metrics_page(), running=BATCH, waiting=QUEUE)
