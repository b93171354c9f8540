"""
Hugging Face text-embeddings-inference (``type: tei``): one embedding
model, its OpenAI ``/v1/embeddings`` route.

* The model is the one ``GET /info`` names (``served_model_name``, else
  ``model_id``), with ``model_type`` (``{"embedding": {"pooling":
  "cls"}}``, a classifier or a reranker), ``model_dtype``,
  ``max_input_length`` and ``max_client_batch_size``; ``GET /health``
  answers 200 with an empty body, 503 when the backend is unhealthy.
* ``/v1/embeddings`` takes ``input``, ``encoding_format`` and
  ``dimensions`` (for Matryoshka models) and ignores ``model``; it refuses
  a batch larger than ``max_client_batch_size`` (32 by default) with a
  422, so the proxy sends a longer list in batches of that size and puts
  the answers back together, in order, with their usage added up.
  Errors there are ``{"message": ..., "code": 422, "type": "Validation"}``
  (``Empty``, 400, for no input; ``Overloaded``, 429; ``Backend``, 424).
* There is no text generation: a chat or completion for its model is a
  400 that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oproxy.backends.base import Call, ModelInfo
from oproxy.backends.openai import OpenAIBackend, whole_number
from oproxy.backends.tgi import info_model
from oproxy.backends.unserved import refused
from oproxy.translate.common import token_count

SERVER = "text-embeddings-inference"


class TEIBackend(OpenAIBackend):
    """A text-embeddings-inference router."""

    #: The largest batch the server takes, once ``/info`` has said.
    batch_limit: int | None = None

    chat_completion = chat_completion_stream = refused(SERVER, "chat completions")
    completion = completion_stream = refused(SERVER, "completions")

    async def embeddings(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        inputs = body.get("input")
        if self.batch_limit is None and isinstance(inputs, list):
            await self._info()
        limit = self.batch_limit
        if not isinstance(inputs, list) or limit is None or len(inputs) <= limit:
            return await super().embeddings(call, body)
        return await self._in_batches(call, body, inputs, limit)

    async def _in_batches(
        self, call: Call, body: Mapping[str, Any], inputs: list[Any], limit: int
    ) -> dict[str, Any]:
        """One request per ``limit`` inputs, one after the other, merged in order."""
        data: list[Any] = []
        prompt_tokens = 0
        answer: dict[str, Any] = {}
        for start in range(0, len(inputs), limit):
            answer = await super().embeddings(
                call, {**body, "input": inputs[start : start + limit]}
            )
            for item in answer.get("data") or ():
                if isinstance(item, dict):
                    item["index"] = start + token_count(item.get("index"))
                    data.append(item)
            usage = answer.get("usage")
            if isinstance(usage, Mapping):
                prompt_tokens += token_count(usage.get("prompt_tokens"))
        return {
            **answer,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }

    async def _info(self) -> dict[str, Any]:
        info = await self.get_json(self._root + "/info")
        info = info if isinstance(info, dict) else {}
        self.batch_limit = whole_number(info.get("max_client_batch_size")) or None
        return info

    async def list_models(self) -> list[dict[str, Any]]:
        info = await self._info()
        model = info_model(info, self.name, "served_model_name")
        model["max_input_length"] = whole_number(info.get("max_input_length"))
        return [model]

    async def probe(self) -> dict[str, Any]:
        """``/health``, then ``/info`` for the model and version."""
        await self.get_json(self._health)
        info = await self._info()
        return {
            "version": info.get("version"),
            "models_available": 1,
            "models_loaded": [info_model(info, self.name, "served_model_name")["id"]],
            "details": {
                "max_input_length": whole_number(info.get("max_input_length")),
                "max_client_batch_size": self.batch_limit,
            },
        }

    async def describe_models(self) -> list[ModelInfo]:
        info = await self._info()
        model_type = info.get("model_type")
        kinds = list(model_type) if isinstance(model_type, dict) else []
        kind = {"embedding": "embeddings"}.get(kinds[0], kinds[0]) if kinds else None
        return [
            ModelInfo(
                id=info_model(info, self.name, "served_model_name")["id"],
                kind=kind,
                quantization=info.get("model_dtype"),
                context_length=whole_number(info.get("max_input_length")),
                loaded=True,
            )
        ]
