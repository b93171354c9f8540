"""
A fake LM Studio server (``lms server start``), written from LM Studio's
developer docs (the OpenAI compatibility endpoints, the REST API v0 and
v1) and the behaviour its users report.

On top of the fake OpenAI server's ``/v1`` routes:

* ``GET /api/v0/models`` and ``/api/v0/models/{model}``: every downloaded
  model with ``type`` (``llm``, ``vlm``, ``embeddings``), ``publisher``,
  ``arch``, ``compatibility_type``, ``quantization``, ``state``
  (``loaded`` / ``not-loaded``) and ``max_context_length``;
* ``GET /api/v1/models`` (LM Studio 0.4): ``{"models": [...]}`` with
  ``key``, ``size_bytes``, ``params_string`` and ``loaded_instances``;
* ``POST /api/v1/models/load`` (``{"model": ...}``, answered once loaded:
  ``{"type", "instance_id", "load_time_seconds", "status": "loaded"}``)
  and ``POST /api/v1/models/unload`` (``{"instance_id": ...}``).

Its quirks, kept: a route it does not have is answered with **HTTP 200**
and ``{"error": "Unexpected endpoint or method. (GET /health)"}`` (so it
has no ``/health``); ``/v1/models`` lists only loaded models unless
just-in-time loading is on (the default), and then every downloaded one,
``owned_by: "organization_owner"``, without ``created``; a request for a
model that is not loaded loads it first and, with auto-evict (the
default), unloads the model the last such load brought in (an explicit
load takes ``load_delay`` seconds);
``max_completion_tokens`` is not read (only ``max_tokens``, ``-1`` meaning
no limit); ``stream_usage=False`` plays a version before 0.3.18, which
sent no usage in streams whatever ``stream_options`` said; embeddings come
only from models of type ``embeddings``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oproxy.testing.base.pacing import Pacer
from oproxy.testing.base.server import Route
from oproxy.testing.openai.models import BROKEN_MESSAGE, FakeOpenAIModel
from oproxy.testing.openai.requests import APIError, check_key, parse_body
from oproxy.testing.openai.server import FakeOpenAI
from oproxy.testing.openai.wire import json_response

__all__ = ["BROKEN_MESSAGE", "DEFAULT_LMSTUDIO_MODELS", "FakeLMStudio", "LMStudioModel"]

LOADED: Final = "loaded"
NOT_LOADED: Final = "not-loaded"


@dataclass(frozen=True)
class LMStudioModel(FakeOpenAIModel):
    """A downloaded model, with what LM Studio's REST API says about it."""

    type: str = "llm"
    publisher: str = "lmstudio-community"
    arch: str = "llama"
    compatibility_type: str = "gguf"
    quantization: str = "Q4_K_M"
    max_context_length: int = 32768
    size_bytes: int = 4_920_734_720
    params_string: str | None = "8B"

    def native(self, state: str) -> dict[str, Any]:
        """The model as ``/api/v0/models`` lists it."""
        return {
            "id": self.id,
            "object": "model",
            "type": self.type,
            "publisher": self.publisher,
            "arch": self.arch,
            "compatibility_type": self.compatibility_type,
            "quantization": self.quantization,
            "state": state,
            "max_context_length": self.max_context_length,
        }


DEFAULT_LMSTUDIO_MODELS: Final = (
    LMStudioModel("qwen2.5-7b-instruct", arch="qwen2", params_string="7B"),
    LMStudioModel("llama-3.2-3b-instruct", max_context_length=131072, params_string="3B"),
    LMStudioModel(
        "qwen2-vl-2b-instruct",
        type="vlm",
        publisher="mlx-community",
        arch="qwen2_vl",
        compatibility_type="mlx",
        quantization="4bit",
        params_string="2B",
    ),
    LMStudioModel(
        "text-embedding-nomic-embed-text-v1.5",
        type="embeddings",
        publisher="nomic-ai",
        arch="nomic-bert",
        quantization="Q4_0",
        max_context_length=2048,
        size_bytes=84_106_624,
        params_string=None,
        dimensions=8,
    ),
    LMStudioModel("slow", token_delay=0.05, answer_tokens=2000),
    LMStudioModel("stall", stall_after=0),
    LMStudioModel("broken", broken_after=3),
)


class FakeLMStudio(FakeOpenAI):
    """
    An in-process fake LM Studio.

    :param loaded: the models in memory at start (default: the first).
    :param jit: just-in-time loading: a request loads its model, and
        ``/v1/models`` lists every downloaded model.
    :param auto_evict: a just-in-time load unloads the model the previous
        one brought in.
    :param load_delay: seconds a load takes.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        models: Sequence[LMStudioModel] = DEFAULT_LMSTUDIO_MODELS,
        loaded: Sequence[str] | None = None,
        jit: bool = True,
        auto_evict: bool = True,
        load_delay: float = 0.0,
        api_key: str | None = None,
        token_delay: float = 0.0,
        stream_usage: bool = True,
    ) -> None:
        super().__init__(
            clock,
            models=models,
            api_key=api_key,
            token_delay=token_delay,
            health_status=None,
            stream_usage=stream_usage,
        )
        self.catalogue = {model.id: model for model in models}
        self.loaded: set[str] = set(loaded if loaded is not None else [models[0].id])
        self._initially_loaded = frozenset(self.loaded)
        self.jit = jit
        self.auto_evict = auto_evict
        self.load_delay = load_delay
        self._jit_loaded: str | None = None
        self.loads = 0

    def reset(self) -> None:
        super().reset()
        self.loaded = set(self._initially_loaded)
        self._jit_loaded = None
        self.loads = 0

    # ------------------------------------------------------------------
    # Routes and the wire format

    def routes(self) -> list[Route]:
        own = [r for r in super().routes() if r[0] != "/health"]
        return [
            *own,
            ("/api/v0/models", ["GET"], self._native_list),
            ("/api/v0/models/<path:model_id>", ["GET"], self._native_one),
            ("/api/v1/models", ["GET"], self._v1_list),
            ("/api/v1/models/load", ["POST"], self._load),
            ("/api/v1/models/unload", ["POST"], self._unload),
        ]

    def before_routing(self, request: Request) -> bytes | None:
        refusal = super().before_routing(request)
        if refusal is None and request.path.startswith(b"/api/"):
            try:
                check_key(self.api_key, request.getHeader(b"authorization"))
            except APIError as error:
                return self.render_error(request, error)
        return refusal

    def not_found(self, request: Request) -> bytes:
        return self._unexpected(request)

    def not_allowed(self, request: Request) -> bytes:
        return self._unexpected(request)

    def _unexpected(self, request: Request) -> bytes:
        """LM Studio's answer to a route it lacks: 200, with an error."""
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        message = f"Unexpected endpoint or method. ({method} {path})"
        return json_response(request, 200, {"error": message})

    def model_entry(self, model: FakeOpenAIModel) -> dict[str, Any]:
        return {"id": model.id, "object": "model", "owned_by": "organization_owner"}

    def _list_models(self, request: Request) -> bytes | Deferred[bytes | None]:
        listed = [m for m in self.catalogue.values() if self.jit or m.id in self.loaded]
        data = [self.model_entry(model) for model in listed]
        return json_response(request, 200, {"object": "list", "data": data})

    # ------------------------------------------------------------------
    # What requests read

    def read_body(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        # Not among LM Studio's documented parameters: it does not limit.
        body = {k: v for k, v in body.items() if k != "max_completion_tokens"}
        if body.get("max_tokens") == -1:
            del body["max_tokens"]
        model = self.catalogue.get(str(body.get("model")))
        if model is not None and route == "embeddings" and model.type != "embeddings":
            raise APIError(
                400,
                f"Model '{model.id}' is not an embedding model. Please load an embedding model.",
            )
        if model is not None and model.id not in self.loaded:
            if not self.jit:
                raise APIError(
                    404,
                    "No models loaded. Please load a model in the developer page or use the "
                    "`lms load` command.",
                    code="model_not_found",
                )
            self._just_in_time(model.id)
        return body

    def _just_in_time(self, model: str) -> None:
        """A request's load: with auto-evict, the previous such load goes."""
        if self.auto_evict and self._jit_loaded is not None:
            self.loaded.discard(self._jit_loaded)
        self.loaded.add(model)
        self._jit_loaded = model
        self.loads += 1

    # ------------------------------------------------------------------
    # The REST API

    def _native_list(self, request: Request) -> bytes:
        data = [m.native(self._state(m.id)) for m in self.catalogue.values()]
        return json_response(request, 200, {"object": "list", "data": data})

    def _native_one(self, request: Request, model_id: str) -> bytes:
        model = self.catalogue.get(model_id)
        if model is None:
            raise APIError(404, f"Model '{model_id}' not found", code="model_not_found")
        return json_response(request, 200, model.native(self._state(model.id)))

    def _state(self, model: str) -> str:
        return LOADED if model in self.loaded else NOT_LOADED

    def _v1_list(self, request: Request) -> bytes:
        models = []
        for model in self.catalogue.values():
            instances = []
            if model.id in self.loaded:
                config = {"context_length": min(4096, model.max_context_length)}
                instances.append({"id": model.id, "config": config})
            models.append(
                {
                    "type": "embedding" if model.type == "embeddings" else "llm",
                    "publisher": model.publisher,
                    "key": model.id,
                    "display_name": model.id,
                    "architecture": model.arch,
                    "quantization": {"name": model.quantization, "bits_per_weight": 4},
                    "size_bytes": model.size_bytes,
                    "params_string": model.params_string,
                    "loaded_instances": instances,
                    "max_context_length": model.max_context_length,
                    "format": model.compatibility_type,
                }
            )
        return json_response(request, 200, {"models": models})

    def _load(self, request: Request) -> bytes | Deferred[bytes | None]:
        body = parse_body(request.content.read() if request.content is not None else b"")
        name = body.get("model")
        model = self.catalogue.get(name) if isinstance(name, str) else None
        if model is None:
            raise APIError(404, f"Model '{name}' not found", code="model_not_found")

        def loaded() -> bytes:
            self.loaded.add(model.id)
            self.loads += 1
            answer = {
                "type": "embedding" if model.type == "embeddings" else "llm",
                "instance_id": model.id,
                "load_time_seconds": self.load_delay,
                "status": "loaded",
            }
            return json_response(request, 200, answer)

        if self.load_delay <= 0:
            return loaded()
        return Pacer(self.clock, self.load_delay, [lambda: None], loaded, lambda: None).start(
            request
        )

    def _unload(self, request: Request) -> bytes:
        body = parse_body(request.content.read() if request.content is not None else b"")
        instance = body.get("instance_id")
        if not isinstance(instance, str) or instance not in self.loaded:
            raise APIError(404, f"No loaded model instance with id '{instance}'")
        self.loaded.discard(instance)
        if self._jit_loaded == instance:
            self._jit_loaded = None
        return json_response(request, 200, {"instance_id": instance})
