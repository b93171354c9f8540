"""
A fake Hugging Face text-embeddings-inference router, written from TEI's
``router/src/http/server.rs`` and ``types.rs`` (its routes, ``Info``, the
OpenAI-compatible request and error types, the batch-size check).

One embedding model, whatever a request calls it (``model`` only earns a
warning).  Routes: ``/info``, ``/health`` (200, empty), ``/embed`` (its
own API: ``{"inputs": ..., "normalize", "dimensions"}`` → a list of
vectors), ``/v1/embeddings`` and its alias ``/embeddings``; an unknown
path is a 404 with an empty body.

Its quirks, kept:

* a batch larger than ``max_client_batch_size`` (32) is refused: 422
  ``batch size 40 > maximum allowed batch size 32``; an empty one is 400
  ``\\`inputs\\` cannot be empty``;
* on ``/v1/embeddings`` errors are ``{"message": ..., "code": 422, "type":
  "Validation"}`` (the type the Rust variant's name), on ``/embed``
  ``{"error": ..., "error_type": "Validation"}``;
* ``model`` in answers is ``served_model_name``; vectors are normalised
  float32, or base64 with ``encoding_format``; ``dimensions`` cuts them
  (Matryoshka).
"""

from __future__ import annotations

from typing import Any, Final, Self

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from oproxy.testing.base.answers import count_words, embed_vector
from oproxy.testing.base.http import respond
from oproxy.testing.base.server import Route
from oproxy.testing.openai.models import FakeOpenAIModel
from oproxy.testing.openai.output import embedding_inputs, embeddings
from oproxy.testing.openai.requests import APIError, parse_body
from oproxy.testing.openai.server import FakeOpenAI
from oproxy.testing.openai.wire import json_response

VERSION: Final = "1.8.0"

#: TEI's ``ErrorType`` variant for each status.
ERROR_TYPES: Final = {
    400: "Empty",
    413: "Validation",
    422: "Validation",
    424: "Backend",
    429: "Overloaded",
    503: "Unhealthy",
}

DEFAULT_TEI_MODEL: Final = FakeOpenAIModel("BAAI/bge-small-en-v1.5", dimensions=8)


class FakeTEI(FakeOpenAI):
    """
    An in-process fake text-embeddings-inference router.

    :param model: the one model (``served_model_name``).
    :param max_client_batch_size: the largest batch it takes.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        model: FakeOpenAIModel = DEFAULT_TEI_MODEL,
        max_client_batch_size: int = 32,
        max_input_length: int = 512,
        api_key: str | None = None,
    ) -> None:
        super().__init__(clock, models=[model], api_key=api_key)
        self.model = model
        self.max_client_batch_size = max_client_batch_size
        self.max_input_length = max_input_length
        self.healthy = True
        #: The batch sizes ``/v1/embeddings`` was given, in order.
        self.batches: list[int] = []

    @classmethod
    def from_command_line(
        cls, clock: IReactorTime, api_key: str | None, token_delay: float
    ) -> Self:
        """Its defaults and the command line's key: embeddings do not stream."""
        return cls(clock, api_key=api_key)

    def reset(self) -> None:
        super().reset()
        self.batches.clear()

    def routes(self) -> list[Route]:
        return [
            ("/info", ["GET"], self._info),
            ("/health", ["GET"], self._health_tei),
            ("/embed", ["POST"], self._embed),
            ("/v1/embeddings", ["POST"], self._openai_embed),
            ("/embeddings", ["POST"], self._openai_embed),
            ("/_fake/fail", ["POST"], self._fake_fail),
        ]

    def error_body(self, error: APIError) -> Any:
        kind = ERROR_TYPES.get(error.status, "Backend")
        return {"message": error.message, "code": error.status, "type": kind}

    def not_found(self, request: Request) -> bytes:
        return respond(request, 404, None, b"")

    def not_allowed(self, request: Request) -> bytes:
        return respond(request, 405, None, b"")

    def _inputs(self, value: Any) -> list[str]:
        """The texts of ``input`` (or ``inputs``), checked as TEI checks them."""
        if isinstance(value, list):
            if not value:
                raise APIError(400, "`inputs` cannot be empty")
            if len(value) > self.max_client_batch_size:
                raise APIError(
                    422,
                    f"batch size {len(value)} > maximum allowed batch size "
                    f"{self.max_client_batch_size}",
                )
        elif not isinstance(value, str):
            raise APIError(422, "Failed to deserialize the JSON body: input: invalid type")
        return embedding_inputs(value)

    def _openai_embed(self, request: Request) -> bytes:
        body = self._inference_body(request)
        texts = self._inputs(body.get("input"))
        self.batches.append(len(texts))
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise APIError(422, "encoding_format: unknown variant")
        dimensions = body.get("dimensions") or self.model.dimensions
        answer = embeddings(self.model.id, texts, dimensions, encoding)
        answer.pop("usage")
        tokens = sum(count_words(text) for text in texts)
        answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        self.stats.count_tokens(self.model.id, tokens)
        return json_response(request, 200, answer)

    def _embed(self, request: Request) -> bytes:
        body = parse_body(request.content.read() if request.content is not None else b"")
        try:
            texts = self._inputs(body.get("inputs"))
        except APIError as error:
            kind = ERROR_TYPES.get(error.status, "Backend")
            return json_response(
                request, error.status, {"error": error.message, "error_type": kind}
            )
        dimensions = body.get("dimensions") or self.model.dimensions
        return json_response(request, 200, [embed_vector(text, dimensions) for text in texts])

    def _info(self, request: Request) -> bytes:
        return json_response(
            request,
            200,
            {
                "model_id": self.model.id,
                "model_sha": "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a",
                "model_dtype": "float16",
                "served_model_name": self.model.id,
                "model_type": {"embedding": {"pooling": "cls"}},
                "max_concurrent_requests": 512,
                "max_input_length": self.max_input_length,
                "max_batch_tokens": 16384,
                "max_batch_requests": None,
                "max_client_batch_size": self.max_client_batch_size,
                "auto_truncate": False,
                "tokenization_workers": 4,
                "version": VERSION,
                "sha": None,
                "docker_label": None,
            },
        )

    def _health_tei(self, request: Request) -> bytes:
        if not self.healthy:
            return json_response(request, 503, {"error": "unhealthy", "error_type": "Unhealthy"})
        return respond(request, 200, None, b"")
