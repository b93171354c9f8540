"""
A fake Hugging Face Inference Providers router
(``https://router.huggingface.co/v1``), written from the Inference
Providers documentation and the router's model listing.

Routes: ``GET /v1/models`` and ``POST /v1/chat/completions``, behind a
required Hugging Face token (``Authorization: Bearer hf_...``).

Its ways, kept:

* ``/v1/models`` lists each model with ``architecture``
  (``input_modalities``, ``output_modalities``) and ``providers``: for each
  ``provider``, ``status`` (``live`` or ``staging``), ``context_length``,
  ``pricing`` and ``supports_tools``;
* a request names ``org/model`` (the router picks the first live
  provider), ``org/model:provider``, or ``org/model:fastest`` /
  ``:cheapest``; a provider that does not serve the model is a 400
  ``model_not_supported``, an unknown model a 404 ``model_not_found``;
* the answer's ``model`` is the provider's own name for the model, which
  is not the name the client sent;
* no token, or a wrong one, is a 401; there is no ``/health``,
  ``/v1/completions`` or ``/v1/embeddings`` (404).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Self

from twisted.internet.interfaces import IReactorTime

from oproxy.testing.base.server import Route
from oproxy.testing.openai.models import FakeOpenAIModel
from oproxy.testing.openai.requests import APIError
from oproxy.testing.openai.server import FakeOpenAI

POLICIES: Final = ("fastest", "cheapest", "preferred")


@dataclass(frozen=True)
class Provider:
    """One provider of a model, as the router's listing describes it."""

    provider: str
    status: str = "live"
    context_length: int = 131072
    input_price: float = 0.2
    output_price: float = 0.6
    supports_tools: bool = True

    def entry(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "context_length": self.context_length,
            "pricing": {"input": self.input_price, "output": self.output_price},
            "supports_tools": self.supports_tools,
            "supports_structured_output": True,
        }


@dataclass(frozen=True)
class RouterModel(FakeOpenAIModel):
    """A model the router serves, and who serves it."""

    providers: tuple[Provider, ...] = field(default=(Provider("together"),))
    inputs: tuple[str, ...] = ("text",)


#: The Hugging Face token it accepts unless told another.
DEFAULT_TOKEN: Final = "hf_fake_token_0123456789"

DEFAULT_ROUTER_MODELS: Final = (
    RouterModel(
        "meta-llama/Llama-3.1-8B-Instruct",
        owned_by="meta-llama",
        providers=(Provider("novita", output_price=0.05), Provider("together")),
    ),
    RouterModel(
        "Qwen/Qwen2.5-VL-7B-Instruct",
        owned_by="Qwen",
        providers=(Provider("hyperbolic", context_length=32768),),
        inputs=("text", "image"),
    ),
    RouterModel("org/slow-model", token_delay=0.05, answer_tokens=2000),
    RouterModel("org/broken-model", broken_after=3),
)


class FakeHuggingFaceRouter(FakeOpenAI):
    """
    An in-process fake of the Inference Providers router.

    :param token: the Hugging Face token it accepts.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        token: str = DEFAULT_TOKEN,
        models: Sequence[RouterModel] = DEFAULT_ROUTER_MODELS,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(
            clock, models=models, api_key=token, token_delay=token_delay, health_status=None
        )
        self.catalogue = {model.id: model for model in models}

    @classmethod
    def from_command_line(
        cls, clock: IReactorTime, api_key: str | None, token_delay: float
    ) -> Self:
        """Its defaults; the command line's key is the token it accepts."""
        return cls(clock, token=api_key or DEFAULT_TOKEN, token_delay=token_delay)

    def routes(self) -> list[Route]:
        keep = ("/v1/models", "/v1/chat/completions", "/_fake/fail")
        return [r for r in super().routes() if r[0] in keep]

    def model_entry(self, model: FakeOpenAIModel) -> dict[str, Any]:
        served = self.catalogue[model.id]
        return {
            "id": model.id,
            "object": "model",
            "created": model.created,
            "owned_by": model.owned_by,
            "architecture": {
                "input_modalities": list(served.inputs),
                "output_modalities": ["text"],
            },
            "providers": [p.entry() for p in served.providers],
        }

    def resolve_model(self, name: str) -> FakeOpenAIModel:
        base, _, chosen = name.partition(":")
        model = self.catalogue.get(base)
        if model is None:
            raise APIError(
                404, f"The requested model '{base}' does not exist.", code="model_not_found"
            )
        live = [p.provider for p in model.providers if p.status == "live"]
        if chosen and chosen not in POLICIES and chosen not in live:
            raise APIError(
                400,
                f"The requested model '{base}' is not supported by provider '{chosen}'.",
                param="model",
                code="model_not_supported",
            )
        return model

    def finish_answer(self, route: str, answer: dict[str, Any]) -> dict[str, Any]:
        # The provider's own name for the model, lower case.
        answer["model"] = str(answer.get("model", "")).lower()
        return answer
