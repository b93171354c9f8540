"""
A fake vLLM OpenAI-compatible server (``vllm serve MODEL``), written from
vLLM's ``entrypoints/openai`` source (the model cards, the error
responses, the serving checks) and its metrics names.

One served model (``--served-model-name``), either generative
(``task="generate"``: chat and completions) or an embedding model
(``task="embed"``: ``/v1/embeddings``).  Routes: ``/health`` (200, empty
body; 503 when :attr:`FakeVLLM.dead`), ``/version``, ``/metrics``
(Prometheus text), ``/v1/models`` and the OpenAI routes of its task.

Its quirks, kept:

* model cards: ``owned_by: "vllm"``, ``root``, ``parent: null``,
  ``max_model_len`` and a ``permission`` list;
* errors: ``{"error": {"message": ..., "type": "BadRequestError", "param":
  ..., "code": 400}}`` (``type`` the exception's name, ``code`` the status
  as a number); an unknown model is 404 ``The model `x` does not exist.``
  with ``param: "model"``; a route the model's task does not serve, or any
  unknown path, is FastAPI's 404 ``{"detail": "Not Found"}``;
* tools with ``tool_choice`` ``auto`` (the default when tools are given)
  need ``--enable-auto-tool-choice``: without it (``auto_tool_choice=False``)
  the request is a 400;
* ``/metrics``: ``vllm:num_requests_running`` and
  ``vllm:num_requests_waiting`` gauges, one sample per ``engine`` and
  ``model_name``; running counts this fake's generations plus
  :attr:`FakeVLLM.running_elsewhere`, waiting is :attr:`FakeVLLM.waiting`.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oproxy.testing.base.http import respond
from oproxy.testing.base.server import Route
from oproxy.testing.openai.models import FakeOpenAIModel
from oproxy.testing.openai.requests import APIError
from oproxy.testing.openai.server import FakeOpenAI
from oproxy.testing.openai.wire import json_response

VERSION: Final = "0.11.0"

#: The exception name vLLM gives each status in an error's ``type``.
ERROR_TYPES: Final = {
    400: "BadRequestError",
    401: "Unauthorized",
    404: "NotFoundError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}

DEFAULT_VLLM_MODEL: Final = FakeOpenAIModel("Qwen/Qwen2.5-7B-Instruct", owned_by="vllm")

_ROUTES_OF: Final = {"generate": ("chat", "completions"), "embed": ("embeddings",)}


class FakeVLLM(FakeOpenAI):
    """
    An in-process fake vLLM server.

    :param model: the served model.
    :param task: ``generate`` or ``embed``.
    :param max_model_len: the context length it serves.
    :param auto_tool_choice: started with ``--enable-auto-tool-choice``.

    :ivar running_elsewhere: requests another client has running.
    :ivar waiting: requests queued (the scheduler's waiting queue).
    :ivar dead: the engine has died: ``/health`` answers 503.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        model: FakeOpenAIModel = DEFAULT_VLLM_MODEL,
        task: str = "generate",
        max_model_len: int = 32768,
        auto_tool_choice: bool = True,
        api_key: str | None = None,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(clock, models=[model], api_key=api_key, token_delay=token_delay)
        self.model = model
        self.task = task
        self.max_model_len = max_model_len
        self.auto_tool_choice = auto_tool_choice
        self.running_elsewhere = 0
        self.waiting = 0
        self.dead = False

    # ------------------------------------------------------------------
    # Routes and the wire format

    def routes(self) -> list[Route]:
        own = [r for r in super().routes() if r[0] != "/health"]
        return [
            *own,
            ("/health", ["GET"], self._health_empty),
            ("/version", ["GET"], self._version),
            ("/metrics", ["GET"], self._metrics),
        ]

    def error_body(self, error: APIError) -> Any:
        return {
            "error": {
                "message": error.message,
                "type": ERROR_TYPES.get(error.status, "InternalServerError"),
                "param": error.param,
                "code": error.status,
            }
        }

    def not_found(self, request: Request) -> bytes:
        return json_response(request, 404, {"detail": "Not Found"})

    def not_allowed(self, request: Request) -> bytes:
        return json_response(request, 405, {"detail": "Method Not Allowed"})

    def resolve_model(self, name: str) -> FakeOpenAIModel:
        if name != self.model.id:
            raise APIError(404, f"The model `{name}` does not exist.", param="model")
        return self.model

    def model_entry(self, model: FakeOpenAIModel) -> dict[str, Any]:
        return {
            "id": model.id,
            "object": "model",
            "created": model.created,
            "owned_by": "vllm",
            "root": model.id,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": "modelperm-fake0000000000000000000000000000",
                    "object": "model_permission",
                    "created": model.created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    # ------------------------------------------------------------------
    # What requests read

    def read_body(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        if route not in _ROUTES_OF.get(self.task, ()):
            raise _NotServed()
        tools = body.get("tools")
        choice = body.get("tool_choice", "auto" if tools else "none")
        if tools and choice == "auto" and not self.auto_tool_choice:
            raise APIError(
                400,
                '"auto" tool choice requires --enable-auto-tool-choice and '
                "--tool-call-parser to be set",
            )
        return body

    def render_error(self, request: Request, error: APIError) -> bytes:
        if isinstance(error, _NotServed):
            return self.not_found(request)
        return super().render_error(request, error)

    # ------------------------------------------------------------------
    # The server's own routes

    def _health_empty(self, request: Request) -> bytes:
        return respond(request, 503 if self.dead else 200, None, b"")

    def _version(self, request: Request) -> bytes:
        return json_response(request, 200, {"version": VERSION})

    def _metrics(self, request: Request) -> bytes:
        labels = f'engine="0",model_name="{self.model.id}"'
        running = self.stats.in_flight + self.running_elsewhere
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {min(1.0, running / 64):.4f}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(self.stats.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {float(self.stats.completion_tokens)}",
        ]
        text = "\n".join(lines) + "\n"
        return respond(request, 200, b"text/plain; version=0.0.4; charset=utf-8", text.encode())


class _NotServed(APIError):
    """A route the served model's task does not have: FastAPI's bare 404."""

    def __init__(self) -> None:
        super().__init__(404, "Not Found")
