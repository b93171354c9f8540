"""
A fake Hugging Face text-generation-inference router, written from TGI's
``router/src/server.rs`` and ``lib.rs`` (its routes, ``Info``,
``ChatRequest``, ``ErrorResponse`` and status mapping).

One model, whatever a request calls it (the ``model`` field is
"[UNUSED]"; answers carry the name the request gave, or ``model_id``).
Routes: ``/info``, ``/health`` (200, empty; 503 ``{"error": "unhealthy",
"error_type": "healthcheck"}`` when not :attr:`FakeTGI.healthy`),
``/metrics``, ``/v1/models`` (``owned_by`` the model id, ``created`` 0),
``/v1/chat/completions`` and ``/v1/completions``; nothing else (an unknown
path is a 404 with an empty body, as axum answers).

Its quirks, kept:

* errors are ``{"error": "...", "error_type": "validation"}`` with 422
  (validation), 424 (generation), 429 (overloaded); a failure during a
  stream is an event of that shape;
* the body is read by serde into ``ChatRequest``, and a body it cannot
  read is axum's plain-text 422 ``Failed to deserialize the JSON body into
  the target type: ...``: ``max_completion_tokens`` is an alias of
  ``max_tokens`` (both is a "duplicate field"), ``logit_bias`` must be a
  list, ``response_format`` is ``{"type": "json" | "json_schema" |
  "regex", "value": ...}`` (OpenAI's ``json_schema`` key is a "missing
  field `value`");
* a whole chat answer's ``id`` is empty; ``system_fingerprint`` is
  ``<version>-native``;
* every streamed tool-call delta repeats ``role``, the call's ``id``,
  ``type`` and the function's ``name``, which a client that adds deltas up
  (the OpenAI SDK's stream helpers) would run together.
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

VERSION: Final = "3.3.6"

#: TGI's ``error_type`` for each status it answers with.
ERROR_TYPES: Final = {
    422: "validation",
    424: "generation",
    429: "overloaded",
    500: "incomplete_generation",
    503: "healthcheck",
}

DEFAULT_TGI_MODEL: Final = FakeOpenAIModel("HuggingFaceH4/zephyr-7b-beta")


class Undeserialisable(APIError):
    """A body serde cannot read into TGI's request type: axum's plain-text 422."""

    def __init__(self, reason: str) -> None:
        super().__init__(422, f"Failed to deserialize the JSON body into the target type: {reason}")


class FakeTGI(FakeOpenAI):
    """
    An in-process fake text-generation-inference router.

    :param model: the one model.
    :param max_total_tokens: ``--max-total-tokens``.

    :ivar healthy: whether ``/health`` passes.
    :ivar queued: requests waiting in its queue (``tgi_queue_size``).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        model: FakeOpenAIModel = DEFAULT_TGI_MODEL,
        max_input_tokens: int = 4095,
        max_total_tokens: int = 4096,
        api_key: str | None = None,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(clock, models=[model], api_key=api_key, token_delay=token_delay)
        self.model = model
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.healthy = True
        self.queued = 0

    def routes(self) -> list[Route]:
        keep = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/_fake/fail")
        own = [r for r in super().routes() if r[0] in keep]
        return [
            *own,
            ("/info", ["GET"], self._info),
            ("/health", ["GET"], self._health_tgi),
            ("/metrics", ["GET"], self._metrics),
        ]

    def error_body(self, error: APIError) -> Any:
        return {"error": error.message, "error_type": ERROR_TYPES.get(error.status, "validation")}

    def render_error(self, request: Request, error: APIError) -> bytes:
        if isinstance(error, Undeserialisable):
            return respond(request, 422, b"text/plain; charset=utf-8", error.message.encode())
        return super().render_error(request, error)

    def not_found(self, request: Request) -> bytes:
        return respond(request, 404, None, b"")

    def not_allowed(self, request: Request) -> bytes:
        return respond(request, 405, None, b"")

    def model_name(self, body: dict[str, Any]) -> str:
        name = body.get("model")
        return name if isinstance(name, str) else self.model.id  # optional here

    def resolve_model(self, name: str) -> FakeOpenAIModel:
        return self.model

    def model_entry(self, model: FakeOpenAIModel) -> dict[str, Any]:
        return {"id": model.id, "object": "model", "created": 0, "owned_by": model.id}

    def read_body(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise Undeserialisable("duplicate field `max_tokens` at line 1 column 1")
        shaped = dict(body)
        if "max_completion_tokens" in shaped:
            shaped["max_tokens"] = shaped.pop("max_completion_tokens")
        bias = shaped.get("logit_bias")
        if bias is not None and not isinstance(bias, list):
            raise Undeserialisable("logit_bias: invalid type: map, expected a sequence")
        shaped.pop("logit_bias", None)  # "UNUSED"
        response_format = shaped.get("response_format")
        if response_format is not None:
            if not isinstance(response_format, dict) or "value" not in response_format:
                raise Undeserialisable("response_format: missing field `value`")
            if response_format.get("type") not in ("json", "json_object", "json_schema", "regex"):
                raise Undeserialisable("response_format: unknown variant")
        limit = shaped.get("max_tokens")
        if isinstance(limit, int) and limit > self.max_total_tokens - 1:
            raise APIError(
                422,
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: 1 `inputs` tokens and {limit} `max_new_tokens`",
            )
        return shaped

    def stream_steps(
        self, route: str, steps: list[list[dict[str, Any]]]
    ) -> list[list[dict[str, Any]]]:
        """
        TGI's tool-call deltas: every one repeats the role, the call's
        ``id``, ``type`` and function ``name`` (its ``ToolCallDelta``), where
        OpenAI sends them once.
        """
        first: dict[str, Any] | None = None
        for step in steps:
            for chunk in step:
                for choice in chunk["choices"]:
                    calls = choice["delta"].get("tool_calls")
                    if not calls:
                        continue
                    if first is None:
                        first = calls[0]
                    choice["delta"]["role"] = "assistant"
                    for call in calls:
                        call["id"] = first["id"]
                        call["type"] = "function"
                        call["function"]["name"] = first["function"]["name"]
        return steps

    def finish_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        answer["system_fingerprint"] = f"{VERSION}-native"
        if route == "chat":
            answer["id"] = ""
        return answer

    # ------------------------------------------------------------------
    # The router's own routes

    def _info(self, request: Request) -> bytes:
        return json_response(
            request,
            200,
            {
                "model_id": self.model.id,
                "model_sha": "8af01af3d4f9dc9b962447180d6d0f8c5315da86",
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": 128,
                "max_best_of": 2,
                "max_stop_sequences": 4,
                "max_input_tokens": self.max_input_tokens,
                "max_total_tokens": self.max_total_tokens,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": VERSION,
                "sha": None,
                "docker_label": None,
            },
        )

    def _health_tgi(self, request: Request) -> bytes:
        if not self.healthy:
            raise APIError(503, "unhealthy")
        return respond(request, 200, None, b"")

    def _metrics(self, request: Request) -> bytes:
        lines = [
            "# TYPE tgi_request_count counter",
            f"tgi_request_count {len(self.stats.requests)}",
            "# TYPE tgi_queue_size gauge",
            f"tgi_queue_size {self.queued}",
            "# TYPE tgi_batch_current_size gauge",
            f"tgi_batch_current_size {self.stats.in_flight}",
        ]
        text = "\n".join(lines) + "\n"
        return respond(request, 200, b"text/plain; version=0.0.4", text.encode())
