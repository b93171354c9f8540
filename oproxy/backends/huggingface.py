"""
Hugging Face Inference Providers (``type: huggingface``): the
OpenAI-compatible router at ``https://router.huggingface.co/v1``, which
sends each request to a partner provider.

* The token is a Hugging Face token with the "Make calls to Inference
  Providers" permission, from ``api_key`` or the ``HF_TOKEN`` environment
  variable (see :mod:`oproxy.config.loading`); it is sent as the bearer
  key and never written anywhere else (the configuration's ``repr`` hides
  it, and a refused key is reported without the router's message).
* ``GET /v1/models`` lists the models with their ``providers`` (``status``
  ``live`` or not, ``context_length``, ``supports_tools``...).  A request
  names a model as ``org/model`` (the router picks the provider),
  ``org/model:provider`` (``:together``, ``:novita``...) or with a policy
  (``:fastest``, ``:cheapest``); routing reads such a name as the listed
  ``org/model`` (:class:`IModelSuffixes`), and the router refuses a
  provider that does not serve it.
* The router serves chat completions only: completions and embeddings for
  its models are a 400 that says so.  There is no ``/health``: the probe
  reads the model list.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from oproxy.backends.base import IModelSuffixes, ModelInfo
from oproxy.backends.openai import OpenAIBackend, whole_number
from oproxy.backends.unserved import refused

DEFAULT_URL = "https://router.huggingface.co/v1"
SERVER = "Hugging Face's Inference Providers router, which serves chat completions only"


@implementer(IModelSuffixes)
class HuggingFaceBackend(OpenAIBackend):
    """The Inference Providers router."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._has_health = False  # the router has none: the listing is the probe

    def listed_as(self, model: str) -> str:
        """``org/model:provider`` (or ``:fastest``...) is listed as ``org/model``."""
        base, colon, _ = model.rpartition(":")
        return base if colon and "/" in base else model

    completion = completion_stream = refused(SERVER, "completions")
    embeddings = refused(SERVER, "embeddings")

    async def describe_models(self) -> list[ModelInfo]:
        """Each model with the longest context a live provider gives it."""
        described = []
        for model in await self.list_models():
            live = [
                p
                for p in model.get("providers") or ()
                if isinstance(p, dict) and p.get("status") == "live"
            ]
            contexts = [whole_number(p.get("context_length")) for p in live]
            architecture = model.get("architecture")
            inputs = (
                architecture.get("input_modalities") if isinstance(architecture, dict) else None
            )
            described.append(
                ModelInfo(
                    id=model["id"],
                    kind="vlm" if isinstance(inputs, list) and "image" in inputs else "llm",
                    context_length=max((c for c in contexts if c), default=None),
                )
            )
        return described
