"""
A fake llama.cpp server (``llama-server -m model.gguf``), written from
``tools/server/README.md`` and the server's source (its routes, its
middleware and its OpenAI request parsing).

One model, served whatever name a request gives.  Routes: ``/health`` and
``/v1/health`` (``{"status": "ok"}``), ``/props``, ``/slots``,
``/metrics`` (only with ``metrics=True``, as with ``--metrics``),
``/models`` and ``/v1/models`` (one model, ``owned_by: "llamacpp"``, its
``meta``), and the OpenAI routes (``/v1/embeddings`` only with
``embedding=True``, as with ``--embeddings``).

Its quirks, kept:

* while loading (``loading=True`` until :meth:`FakeLlamaCpp.finish_loading`)
  every route but ``/models``, ``/v1/models`` and ``/api/tags`` answers
  503 ``{"error": {"code": 503, "message": "Loading model", "type":
  "unavailable_error"}}``, ``/health`` included; ``/v1/models`` answers
  with ``meta: null``;
* errors are ``{"error": {"code": 400, "message": ..., "type":
  "invalid_request_error"}}`` (the code a number), 401 is ``Invalid API
  Key`` / ``authentication_error`` (``/health`` and the model lists need no
  key), a disabled ``/slots`` or ``/metrics`` is 501 ``not_supported_error``;
* the limit is read from ``n_predict`` or ``max_tokens``;
  ``max_completion_tokens`` is ignored; ``n`` other than 1 is refused
  ("Only one completion choice is allowed"), and so are ``echo`` ("Only no
  echo is supported") and ``suffix`` or ``best_of`` ("Unsupported param:
  suffix") on completions;
* ``/slots`` shows a slot ``is_processing`` for each generation running
  (and for :attr:`FakeLlamaCpp.busy_elsewhere` more, another client's);
  answers carry ``timings``.
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
from oproxy.testing.openai.wire import SeenRequest, json_response

BUILD_INFO: Final = "b6500-fakefake"

#: The error ``type`` llama.cpp gives each status.
ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

#: Routes that answer while the model loads, and without a key.
PUBLIC: Final = frozenset((b"/health", b"/v1/health", b"/models", b"/v1/models", b"/api/tags"))
WHILE_LOADING: Final = frozenset((b"/models", b"/v1/models", b"/api/tags"))

DEFAULT_LLAMACPP_MODEL: Final = FakeOpenAIModel("qwen2.5-7b-instruct-q4_k_m.gguf", dimensions=8)


class FakeLlamaCpp(FakeOpenAI):
    """
    An in-process fake ``llama-server``.

    :param model: the one model (its ``id`` is the path or ``--alias``).
    :param slots: ``--parallel``.
    :param n_ctx: the context size the server runs with.
    :param slots_endpoint: ``/slots`` is on (``--no-slots`` turns it off).
    :param metrics: ``/metrics`` is on (``--metrics``).
    :param embedding: ``/v1/embeddings`` works (``--embeddings``).
    :param loading: the model is still loading.

    :ivar busy_elsewhere: slots another client keeps busy.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        model: FakeOpenAIModel = DEFAULT_LLAMACPP_MODEL,
        slots: int = 4,
        n_ctx: int = 4096,
        slots_endpoint: bool = True,
        metrics: bool = False,
        embedding: bool = False,
        loading: bool = False,
        api_key: str | None = None,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(clock, models=[model], api_key=api_key, token_delay=token_delay)
        self.model = model
        self.slots = slots
        self.n_ctx = n_ctx
        self.slots_endpoint = slots_endpoint
        self.metrics = metrics
        self.embedding = embedding
        self.loading = loading
        self.busy_elsewhere = 0

    def finish_loading(self) -> None:
        """The model is loaded: every route answers."""
        self.loading = False

    @property
    def processing(self) -> int:
        """Slots processing now: this fake's generations, and another client's."""
        return min(self.slots, self.stats.in_flight + self.busy_elsewhere)

    # ------------------------------------------------------------------
    # Routes and the wire format

    def routes(self) -> list[Route]:
        own = [r for r in super().routes() if r[0] not in ("/health", "/v1/models/<path:model_id>")]
        return [
            *own,
            ("/health", ["GET"], self._health_ok),
            ("/v1/health", ["GET"], self._health_ok),
            ("/models", ["GET"], self._list_models),
            ("/props", ["GET"], self._props),
            ("/slots", ["GET"], self._slots),
            ("/metrics", ["GET"], self._metrics),
        ]

    def before_routing(self, request: Request) -> bytes | None:
        """The server's middleware: the loading gate, then the key (not on public routes)."""
        request.responseHeaders.setRawHeaders(b"x-request-id", [self.next_request_id()])
        path = request.path
        if not path.startswith(b"/_fake/"):
            self.stats.requests.append(SeenRequest.arrived(request, path.decode("latin-1")))
        if self.loading and path not in WHILE_LOADING and not path.startswith(b"/_fake/"):
            return self.render_error(request, APIError(503, "Loading model"))
        if self.api_key is not None and path not in PUBLIC and not path.startswith(b"/_fake/"):
            given = (request.getHeader(b"authorization") or b"").decode("latin-1")
            if given.removeprefix("Bearer ").strip() != self.api_key:
                return self.render_error(request, APIError(401, "Invalid API Key"))
        return None

    def error_body(self, error: APIError) -> Any:
        kind = ERROR_TYPES.get(error.status, "server_error")
        return {"error": {"code": error.status, "message": error.message, "type": kind}}

    def not_found(self, request: Request) -> bytes:
        return respond(request, 404, b"text/plain", b"File Not Found")

    def not_allowed(self, request: Request) -> bytes:
        return respond(request, 405, b"text/plain", b"Method Not Allowed")

    def model_name(self, body: dict[str, Any]) -> str:
        name = body.get("model")
        return name if isinstance(name, str) else self.model.id  # optional here

    def resolve_model(self, name: str) -> FakeOpenAIModel:
        return self.model  # one model, whatever the request calls it

    def model_entry(self, model: FakeOpenAIModel) -> dict[str, Any]:
        meta = None
        if not self.loading:
            meta = {
                "vocab_type": 2,
                "n_vocab": 152064,
                "n_ctx_train": 32768,
                "n_embd": 3584,
                "n_params": 7615616512,
                "size": 4677120000,
            }
        return {
            "id": model.id,
            "object": "model",
            "created": model.created,
            "owned_by": "llamacpp",
            "meta": meta,
        }

    # ------------------------------------------------------------------
    # What requests read

    def read_body(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        if route == "embeddings" and not self.embedding:
            raise APIError(
                501, "This server does not support embeddings. Start it with `--embeddings`"
            )
        if route in ("chat", "completions") and body.get("n", 1) != 1:
            raise APIError(400, "Only one completion choice is allowed")
        if route == "completions":
            if body.get("echo") is True:
                raise APIError(400, "Only no echo is supported")
            for param in ("best_of", "suffix"):
                if param in body:
                    raise APIError(400, f"Unsupported param: {param}")
        # n_predict, else max_tokens: max_completion_tokens is not read.
        shaped = {k: v for k, v in body.items() if k != "max_completion_tokens"}
        if isinstance(body.get("n_predict"), int):
            shaped["max_tokens"] = body["n_predict"]
        return shaped

    def finish_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        if route == "embeddings":
            return answer
        usage = answer.get("usage") or {}
        answer["system_fingerprint"] = BUILD_INFO
        answer["timings"] = {
            "prompt_n": usage.get("prompt_tokens", 0),
            "prompt_ms": 12.5,
            "predicted_n": usage.get("completion_tokens", 0),
            "predicted_ms": 80.0,
        }
        return answer

    # ------------------------------------------------------------------
    # The server's own routes

    def _health_ok(self, request: Request) -> bytes:
        return json_response(request, 200, {"status": "ok"})

    def _settings(self, slot: int, processing: bool) -> dict[str, Any]:
        return {
            "id": slot,
            "id_task": -1 if not processing else 100 + slot,
            "n_ctx": self.n_ctx,
            "speculative": False,
            "is_processing": processing,
            "params": {"n_predict": -1, "seed": 4294967295, "temperature": 0.8, "top_k": 40},
            "next_token": {
                "has_next_token": processing,
                "has_new_line": False,
                "n_remain": -1,
                "n_decoded": 0,
            },
        }

    def _props(self, request: Request) -> bytes:
        return json_response(
            request,
            200,
            {
                "default_generation_settings": self._settings(0, False),
                "total_slots": self.slots,
                "model_path": f"/models/{self.model.id}",
                "chat_template": "{% for message in messages %}...{% endfor %}",
                "modalities": {"vision": False, "audio": False},
                "build_info": BUILD_INFO,
            },
        )

    def _slots(self, request: Request) -> bytes:
        if not self.slots_endpoint:
            raise APIError(
                501, "This server does not support slots endpoint. Start it with `--slots`"
            )
        busy = self.processing
        if request.args.get(b"fail_on_no_slot") == [b"1"] and busy >= self.slots:
            raise APIError(503, "no slot available")
        slots = [self._settings(i, i < busy) for i in range(self.slots)]
        return json_response(request, 200, slots)

    def _metrics(self, request: Request) -> bytes:
        if not self.metrics:
            raise APIError(501, "This server does not support metrics endpoint.")
        stats = self.stats
        deferred = max(0, stats.in_flight + self.busy_elsewhere - self.slots)
        lines = [
            "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.",
            "# TYPE llamacpp:prompt_tokens_total counter",
            f"llamacpp:prompt_tokens_total {stats.prompt_tokens}",
            "# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.",
            "# TYPE llamacpp:tokens_predicted_total counter",
            f"llamacpp:tokens_predicted_total {stats.completion_tokens}",
            "# HELP llamacpp:requests_processing Number of requests processing.",
            "# TYPE llamacpp:requests_processing gauge",
            f"llamacpp:requests_processing {self.processing}",
            "# HELP llamacpp:requests_deferred Number of requests deferred.",
            "# TYPE llamacpp:requests_deferred gauge",
            f"llamacpp:requests_deferred {deferred}",
        ]
        text = "\n".join(lines) + "\n"
        return respond(request, 200, b"text/plain; version=0.0.4", text.encode())
