"""
llama.cpp's server (``type: llamacpp``, ``llama-server``): one model, its
OpenAI routes, and the routes that say how it is doing.

* ``GET /health`` answers 503 ``{"error": {"code": 503, "message":
  "Loading model", "type": "unavailable_error"}}`` while the model loads
  (every route but ``/v1/models`` does), then ``{"status": "ok"}``.
* ``GET /v1/models`` lists the one model (its path or ``--alias``), with
  ``meta`` (``n_ctx_train``, ``n_params``, ``size``) once it is loaded;
  ``GET /props`` gives the context the server runs with (``n_ctx``), its
  slot count and ``build_info``.
* ``GET /slots`` says which slots are processing (:class:`IBusyness`);
  a server started with ``--no-slots`` answers 501 there, and its
  ``/metrics`` (with ``--metrics``) gives ``llamacpp:requests_processing``
  and ``llamacpp:requests_deferred`` instead.
* Requests: the server reads ``n_predict`` or ``max_tokens`` and ignores
  ``max_completion_tokens``, which is sent under the older name; it
  refuses ``echo`` ("Only no echo is supported") and ``suffix`` on
  completions, so the proxy echoes the prompt itself and refuses a suffix
  with a 400 before sending.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from zope.interface import implementer

from oproxy.backends.base import Call, IBusyness, ISamplingFields, Load, ModelInfo
from oproxy.backends.openai import OpenAIBackend, whole_number
from oproxy.backends.prometheus import gauge_load
from oproxy.backends.shaping import max_tokens_only, without
from oproxy.errors import InvalidRequest, UpstreamError

#: The server's own sampling fields (its ``/completion`` options, which its
#: OpenAI routes read too).
SAMPLING = frozenset(
    (
        "top_k",
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "dynatemp_range",
        "dynatemp_exponent",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "xtc_probability",
        "xtc_threshold",
        "n_keep",
        "cache_prompt",
    )
)

PROCESSING = "llamacpp:requests_processing"
DEFERRED = "llamacpp:requests_deferred"


@implementer(IBusyness, ISamplingFields)
class LlamaCppBackend(OpenAIBackend):
    """A ``llama-server`` process serving one model."""

    sampling_fields = SAMPLING

    def adapt(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        if path == "/completions" and payload.get("suffix") is not None:
            raise InvalidRequest(
                "suffix is not supported by this model's server (llama.cpp); "
                "use its /infill route directly for fill-in-the-middle",
                param="suffix",
                code="unsupported_parameter",
            )
        return without(max_tokens_only(payload), "echo")

    async def completion(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        prompt = _echoed(body)
        answer = await super().completion(call, body)
        if prompt:
            for choice in answer.get("choices") or ():
                if isinstance(choice, dict):
                    choice["text"] = prompt + (choice.get("text") or "")
        return answer

    async def completion_stream(
        self, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        prompt = _echoed(body)
        chunks = await super().completion_stream(call, body)
        return _with_echo(chunks, prompt) if prompt else chunks

    async def probe(self) -> dict[str, Any]:
        """
        ``/health`` (a 503 while loading is raised as busy), then ``/props``
        for the build, the context size and the slots.
        """
        await self.get_json(self._root + "/health")
        props = await self.get_json(self._root + "/props")
        props = props if isinstance(props, dict) else {}
        settings = props.get("default_generation_settings")
        settings = settings if isinstance(settings, dict) else {}
        models = await self.list_models()
        return {
            "version": props.get("build_info"),
            "models_available": len(models),
            "models_loaded": [m["id"] for m in models],
            "details": {
                "context_length": whole_number(settings.get("n_ctx")),
                "slots": whole_number(props.get("total_slots")),
                "model_path": props.get("model_path"),
            },
        }

    async def load(self) -> Load:
        """Slots processing from ``/slots``, else ``/metrics`` when slots are hidden."""
        status, headers, body = await self._upstream.send_json("GET", self._root + "/slots")
        if status == 200 and isinstance(body, list):
            slots = [s for s in body if isinstance(s, dict)]
            running = sum(1 for s in slots if s.get("is_processing") is True)
            return Load(running=running, slots=len(slots))
        if status != 501:
            raise self.error(status, body, headers)
        status, headers, raw = await self._upstream.get_bytes(self._root + "/metrics")
        if status != 200:
            raise UpstreamError(
                f"backend {self.name!r} shows neither /slots nor /metrics "
                "(start llama-server with --slots or --metrics)"
            )
        return gauge_load(raw, running=PROCESSING, waiting=DEFERRED)

    async def describe_models(self) -> list[ModelInfo]:
        """The one model, with the context size the server was started with."""
        models = await self.list_models()
        status, _, props = await self._upstream.send_json("GET", self._root + "/props")
        settings = props.get("default_generation_settings") if status == 200 else None
        n_ctx = whole_number(settings.get("n_ctx")) if isinstance(settings, dict) else None
        described = []
        for model in models:
            meta = model.get("meta") if isinstance(model.get("meta"), dict) else None
            described.append(
                ModelInfo(
                    id=model["id"],
                    size=whole_number(meta.get("size")) if meta else None,
                    parameters=str(meta["n_params"]) if meta and meta.get("n_params") else None,
                    context_length=n_ctx
                    or (whole_number(meta.get("n_ctx_train")) if meta else None),
                    loaded=meta is not None and status == 200,
                )
            )
        return described


def _echoed(body: Mapping[str, Any]) -> str:
    """
    The prompt to put before the answer when ``echo`` is asked for, which
    the proxy does itself; ``""`` when it is not.

    :raises InvalidRequest: for an echo of a prompt given as token ids,
        which the proxy cannot turn back into text.
    """
    if body.get("echo") is not True:
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest(
            "echo of a prompt given as token ids is not supported by this model's server",
            param="echo",
            code="unsupported_parameter",
        )
    return prompt


async def _with_echo(
    chunks: AsyncGenerator[dict[str, Any], None], prompt: str
) -> AsyncGenerator[dict[str, Any], None]:
    """The stream with the prompt put before the first text it carries."""
    pending = True
    async with aclosing(chunks):
        async for chunk in chunks:
            if pending:
                for choice in chunk.get("choices") or ():
                    if isinstance(choice, dict):
                        choice["text"] = prompt + (choice.get("text") or "")
                        pending = False
            yield chunk
