"""
LM Studio (``type: lmstudio``): its OpenAI routes for generation, its own
REST API for what the OpenAI API does not say.

* Models come from ``GET /api/v0/models`` (LM Studio 0.3.6 and later):
  every downloaded model, with its ``type`` (``llm``, ``vlm``,
  ``embeddings``), ``arch``, ``quantization``, ``max_context_length`` and
  ``state`` (``loaded`` or ``not-loaded``).  ``/v1/models`` lists only the
  loaded ones unless just-in-time loading is on, so it is asked only of an
  older server without ``/api/v0``.  The ``state`` is what ``prefer-warm``
  routing reads (:class:`ILoadedModels`).
* Models are loaded and unloaded with ``POST /api/v1/models/load`` and
  ``/api/v1/models/unload`` (LM Studio 0.4), the latter by instance id,
  read from ``GET /api/v1/models`` (:class:`IModelLoading`), which also
  gives sizes and parameter counts for the console.
* Requests: LM Studio's documented parameters include ``max_tokens`` but
  not ``max_completion_tokens``, which it ignores; the proxy sends the
  limit under the name it reads.  There is no ``/health`` (LM Studio
  answers a route it does not have with HTTP 200 and ``{"error":
  "Unexpected endpoint or method. (GET /health)"}``, so a generic probe of
  ``/health`` would always pass): the probe reads the model list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from oproxy.backends.base import ILoadedModels, IModelLoading, ISamplingFields, ModelInfo
from oproxy.backends.openai import OpenAIBackend, whole_number
from oproxy.backends.shaping import max_tokens_only
from oproxy.errors import ModelNotFound, UpstreamError

LOADED = "loaded"

#: LM Studio's documented parameters beyond OpenAI's, and ``ttl``: how
#: long a model it loads for the request stays loaded when idle.
SAMPLING = frozenset(("top_k", "repeat_penalty", "ttl"))


@implementer(ILoadedModels, IModelLoading, ISamplingFields)
class LMStudioBackend(OpenAIBackend):
    """An LM Studio server (its API server, ``lms server start``)."""

    sampling_fields = SAMPLING

    def adapt(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return max_tokens_only(payload)

    async def _native_models(self) -> list[dict[str, Any]] | None:
        """``/api/v0/models``' entries, or ``None`` on a server without that API."""
        status, headers, body = await self._upstream.send_json("GET", self._root + "/api/v0/models")
        if status in (404, 405) or _unexpected_endpoint(body):
            return None
        if status != 200:
            raise self.error(status, body, headers)
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list):
            raise UpstreamError(f"backend {self.name!r} listed its models in an unknown shape")
        return [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)]

    async def list_models(self) -> list[dict[str, Any]]:
        native = await self._native_models()
        if native is None:
            return await self.openai_models()
        return [self._model(entry) for entry in native]

    async def loaded_models(self) -> list[str]:
        native = await self._native_models()
        if native is None:
            return []
        return [entry["id"] for entry in native if entry.get("state") == LOADED]

    async def probe(self) -> dict[str, Any]:
        """The model list, which says what is loaded: LM Studio has no ``/health``."""
        native = await self._native_models()
        if native is None:
            models = await self.openai_models()
            return {"version": None, "models_available": len(models), "models_loaded": []}
        loaded = [entry["id"] for entry in native if entry.get("state") == LOADED]
        return {"version": None, "models_available": len(native), "models_loaded": loaded}

    async def describe_models(self) -> list[ModelInfo]:
        native = await self._native_models()
        if native is None:
            return await super().describe_models()
        sizes = await self._v1_models()
        described = []
        for entry in native:
            more = sizes.get(entry["id"], {})
            described.append(
                ModelInfo(
                    id=entry["id"],
                    kind=_text(entry.get("type")),
                    family=_text(entry.get("arch")),
                    size=whole_number(more.get("size_bytes")),
                    parameters=_text(more.get("params_string")),
                    quantization=_text(entry.get("quantization")),
                    context_length=whole_number(entry.get("max_context_length")),
                    loaded=entry.get("state") == LOADED,
                )
            )
        return described

    async def _v1_models(self) -> dict[str, dict[str, Any]]:
        """``/api/v1/models`` by key (LM Studio 0.4), or nothing on an older server."""
        status, headers, body = await self._upstream.send_json("GET", self._root + "/api/v1/models")
        if status in (404, 405) or _unexpected_endpoint(body):
            return {}
        if status != 200:
            raise self.error(status, body, headers)
        models = body.get("models") if isinstance(body, Mapping) else None
        return {
            entry["key"]: entry
            for entry in models or ()
            if isinstance(entry, dict) and isinstance(entry.get("key"), str)
        }

    async def load_model(self, model: str) -> None:
        """``POST /api/v1/models/load``, which answers once the model is loaded."""
        await self._post(self._root + "/api/v1/models/load", {"model": model}, model)

    async def unload_model(self, model: str) -> None:
        """Every loaded instance of ``model``, each by its instance id."""
        found = (await self._v1_models()).get(model)
        if found is None:
            raise ModelNotFound(model)
        for instance in found.get("loaded_instances") or ():
            if isinstance(instance, dict) and isinstance(instance.get("id"), str):
                payload = {"instance_id": instance["id"]}
                await self._post(self._root + "/api/v1/models/unload", payload, model)

    async def _post(self, path: str, payload: Mapping[str, Any], model: str) -> None:
        status, headers, body = await self._upstream.send_json("POST", path, payload)
        if status != 200:
            raise self.error(status, body, headers, model=model)


def _unexpected_endpoint(body: object) -> bool:
    """
    LM Studio's answer to a route it does not have: HTTP 200 with
    ``{"error": "Unexpected endpoint or method. (GET /api/v0/models)"}``
    (an older server, without that API).
    """
    error = body.get("error") if isinstance(body, Mapping) else None
    return isinstance(error, str) and error.startswith("Unexpected endpoint")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
