"""
vLLM's OpenAI-compatible server (``type: vllm``, ``vllm serve``).

* ``GET /v1/models`` lists the served model (its ``--served-model-name``)
  with ``max_model_len``, and any LoRA adapters with their ``parent``;
  ``GET /health`` answers 200 with an empty body, 503 once the engine is
  dead; ``GET /version`` gives the version.
* How busy it is comes from its Prometheus ``/metrics``:
  ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` (one
  sample per engine and model, summed), for ``least-busy`` routing
  (:class:`IBusyness`).
* Requests pass as they are: vLLM reads both ``max_tokens`` and
  ``max_completion_tokens``, honours ``stream_options.include_usage``,
  streams tool calls as deltas, and takes its own sampling fields
  (``top_k``, ``min_p``, ``repetition_penalty``) beside OpenAI's.  What it
  refuses (``"tool_choice": "auto"`` on a server started without
  ``--enable-auto-tool-choice``) it refuses with a 400 that reaches the
  client as it is.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from oproxy.backends.base import IBusyness, ISamplingFields, Load, ModelInfo
from oproxy.backends.openai import OpenAIBackend, whole_number
from oproxy.backends.prometheus import gauge_load

#: vLLM's sampling parameters beyond OpenAI's, read at the top level.
SAMPLING = frozenset(
    (
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "min_tokens",
        "ignore_eos",
        "skip_special_tokens",
    )
)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


@implementer(IBusyness, ISamplingFields)
class VLLMBackend(OpenAIBackend):
    """A vLLM server."""

    sampling_fields = SAMPLING

    async def load(self) -> Load:
        return gauge_load(await self.metrics_page(), running=RUNNING, waiting=WAITING)

    async def probe(self) -> dict[str, Any]:
        """``/health``, ``/version``, and the queue from ``/metrics``."""
        status, headers, body = await self._upstream.send_json("GET", self._health)
        if status != 200:
            raise self.error(status, body, headers)
        version = await self.get_json(self._root + "/version")
        models = await self.list_models()
        load = await self.load()
        return {
            "version": version.get("version") if isinstance(version, dict) else None,
            "models_available": len(models),
            "models_loaded": [m["id"] for m in models],
            "details": {"requests_running": load.running, "requests_waiting": load.waiting},
        }

    async def describe_models(self) -> list[ModelInfo]:
        """The served model and its adapters, all in memory as long as vLLM runs."""
        return [
            ModelInfo(
                id=model["id"],
                context_length=whole_number(model.get("max_model_len")),
                loaded=True,
            )
            for model in await self.list_models()
        ]
