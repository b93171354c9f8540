"""
The Ollama adapter: the OpenAI API on top of Ollama's native ``/api/*``.

Translation is done by the pure functions in :mod:`oproxy.translate`; this
module only sends, receives and maps Ollama's errors to ours.  Each call is
one generation (one prompt, one choice): :mod:`oproxy.api.choices` runs the
prompts of a list and the ``n`` choices of a request as separate calls.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from zope.interface import implementer

from oproxy.backends.base import (
    Call,
    IImplicitLatest,
    IInlineImages,
    ILoadedModels,
    IModelLoading,
    IModelManagement,
    IRuntimeOptions,
    ModelInfo,
)
from oproxy.errors import (
    InvalidRequest,
    ModelNotFound,
    OProxyError,
    UpstreamBusy,
    UpstreamError,
)
from oproxy.together import all_of
from oproxy.translate import chat, completions, embeddings, models
from oproxy.translate.common import (
    combined_usage,
    new_completion_id,
    usage_from_ollama,
    wants_usage_chunk,
)
from oproxy.upstream import Upstream


def ollama_error(status: int, body: Any, call_model: str, backend: str) -> OProxyError:
    """
    Turn an Ollama error answer into the error the client should see.

    Ollama's messages are kept (they are what a user searches for); the
    status is mapped to OpenAI's meaning of it.
    """
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message:
        message = f"backend {backend!r} answered HTTP {status}"
    if status == 404 and "not found" in message:
        return ModelNotFound(call_model)
    if status == 400:
        return InvalidRequest(message)
    if status in (429, 503):
        return UpstreamBusy(message)
    if status == 403 and not isinstance(body, dict):
        return UpstreamError(
            f"backend {backend!r} refused the request (403); if it is Ollama, "
            "set the backend's host_header to a local name such as 127.0.0.1"
        )
    return UpstreamError(f"backend {backend!r} failed: {message}")


@implementer(
    IModelManagement,
    IImplicitLatest,
    IRuntimeOptions,
    IInlineImages,
    ILoadedModels,
    IModelLoading,
)
class OllamaBackend:
    """
    An Ollama server, spoken to in its native API.
    """

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self.weight = upstream.backend.weight
        self.kind = upstream.backend.type

    @property
    def name(self) -> str:
        return self._upstream.name

    @property
    def upstream(self) -> Upstream:
        """The HTTP client to this server, for the native API passed through as is."""
        return self._upstream

    async def _post(self, path: str, payload: Mapping[str, Any], call: Call) -> Any:
        status, body = await self._upstream.request_json("POST", path, payload, call.upstream_time)
        if status != 200:
            raise ollama_error(status, body, call.client_model, self.name)
        if not isinstance(body, dict):
            raise UpstreamError(f"backend {self.name!r} sent an answer that is not JSON")
        return body

    async def _stream(
        self, path: str, payload: Mapping[str, Any], call: Call
    ) -> AsyncGenerator[Any, None]:
        status, lines = await self._upstream.stream_json_lines(path, payload, call.upstream_time)
        if status != 200:
            async with aclosing(lines):
                body = await anext(lines, None)
            raise ollama_error(status, body, call.client_model, self.name)
        return lines

    async def chat_completion(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        native = chat.chat_request_to_ollama(
            body, model=call.upstream_model, fetched_images=call.images
        )
        answer = await self._post("/api/chat", native, call)
        result = chat.ollama_chat_to_openai(
            answer,
            completion_id=new_completion_id("chatcmpl-"),
            model=call.client_model,
            created=call.created,
        )
        call.on_usage(result["usage"])
        return result

    async def chat_completion_stream(
        self, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        native = chat.chat_request_to_ollama(
            body, model=call.upstream_model, fetched_images=call.images
        )
        lines = await self._stream("/api/chat", native, call)
        translator = chat.ChatStreamTranslator(
            new_completion_id("chatcmpl-"),
            call.client_model,
            call.created,
            include_usage=wants_usage_chunk(body),
        )
        return _translated(lines, translator, self.name, call)

    async def completion(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        prompt = completions.single_prompt(body)
        native = completions.completion_request_to_ollama(
            body, model=call.upstream_model, prompt=prompt
        )
        answer = await self._post("/api/generate", native, call)
        choice = completions.ollama_generate_to_choice(
            answer,
            index=0,
            echo_prompt=prompt if completions.echo_requested(body) else None,
            logprobs_requested=completions.requested_logprobs(body) is not None,
        )
        usage = usage_from_ollama(answer)
        call.on_usage(usage)
        return completions.completion_response(
            [choice],
            completion_id=new_completion_id("cmpl-"),
            model=call.client_model,
            created=call.created,
            usage=usage,
        )

    async def completion_stream(
        self, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        prompt = completions.single_prompt(body)
        native = completions.completion_request_to_ollama(
            body, model=call.upstream_model, prompt=prompt
        )
        completion_id = new_completion_id("cmpl-")
        translator = completions.CompletionStreamTranslator(
            completion_id,
            call.client_model,
            call.created,
            index=0,
            echo_prompt=prompt if completions.echo_requested(body) else None,
            logprobs_requested=completions.requested_logprobs(body) is not None,
        )
        lines = await self._stream("/api/generate", native, call)
        chunks = _translated(lines, translator, self.name, call)
        if not wants_usage_chunk(body):
            return chunks
        return _with_usage_chunk(chunks, translator, completion_id, call)

    async def embeddings(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        inputs = embeddings.embedding_inputs(body)
        encoding = embeddings.encoding_format(body)
        native = embeddings.embeddings_request_to_ollama(
            body, model=call.upstream_model, inputs=inputs
        )
        answer = await self._post("/api/embed", native, call)
        result = embeddings.ollama_embed_to_openai(
            answer, model=call.client_model, encoding_format=encoding
        )
        call.on_usage(result["usage"])
        return result

    async def list_models(self) -> list[dict[str, Any]]:
        status, body = await self._upstream.request_json("GET", "/api/tags")
        if status != 200:
            raise ollama_error(status, body, "", self.name)
        listing = models.ollama_tags_to_models(body or {}, owned_by=self.name)
        data: list[dict[str, Any]] = listing["data"]
        return data

    async def retrieve_model(self, model_id: str) -> dict[str, Any]:
        status, show = await self._upstream.request_json("POST", "/api/show", {"model": model_id})
        if status in (400, 404):  # Ollama's "invalid model name" means none such, too
            raise ModelNotFound(model_id)
        if status != 200 or not isinstance(show, dict):
            raise ollama_error(status, show, model_id, self.name)
        return models.ollama_show_to_model(show, model_id=model_id, owned_by=self.name)

    async def probe(self) -> dict[str, Any]:
        version, tags, loaded = await all_of(
            [
                self._get_json("/api/version"),
                self._get_json("/api/tags"),
                self._get_json("/api/ps"),
            ]
        )
        return {
            "version": version.get("version"),
            "models_available": len(tags.get("models") or []),
            "models_loaded": [m.get("name") or m.get("model") for m in loaded.get("models") or []],
        }

    async def loaded_models(self) -> list[str]:
        """What ``/api/ps`` lists."""
        loaded = await self._get_json("/api/ps")
        return [m.get("name") or m.get("model") for m in loaded.get("models") or []]

    async def describe_models(self) -> list[ModelInfo]:
        """
        ``/api/tags`` (size on disk, family, parameters, quantization) and
        ``/api/ps`` (what is loaded, with the context it was loaded with).
        """
        tags, loaded = await all_of([self._get_json("/api/tags"), self._get_json("/api/ps")])
        running = {
            m.get("name") or m.get("model"): m
            for m in loaded.get("models") or []
            if isinstance(m, dict)
        }
        described = []
        for model in tags.get("models") or []:
            if not isinstance(model, dict) or not isinstance(model.get("name"), str):
                continue
            details = model.get("details")
            if not isinstance(details, dict):
                details = {}
            in_memory = running.get(model["name"])
            context = in_memory.get("context_length") if in_memory else None
            described.append(
                ModelInfo(
                    id=model["name"],
                    family=details.get("family"),
                    size=model.get("size") if isinstance(model.get("size"), int) else None,
                    parameters=details.get("parameter_size"),
                    quantization=details.get("quantization_level"),
                    context_length=context if isinstance(context, int) else None,
                    loaded=in_memory is not None,
                )
            )
        return described

    async def load_model(self, model: str) -> None:
        """An empty ``/api/generate``: Ollama loads the model and answers once it has."""
        await self._manage(model, {"model": model, "stream": False})

    async def unload_model(self, model: str) -> None:
        """An empty ``/api/generate`` with ``keep_alive: 0``."""
        await self._manage(model, {"model": model, "keep_alive": 0, "stream": False})

    async def _manage(self, model: str, payload: Mapping[str, Any]) -> None:
        status, body = await self._upstream.request_json("POST", "/api/generate", payload)
        if status != 200:
            raise ollama_error(status, body, model, self.name)

    async def _get_json(self, path: str) -> dict[str, Any]:
        status, body = await self._upstream.request_json("GET", path)
        if status != 200 or not isinstance(body, dict):
            raise ollama_error(status, body, "", self.name)
        return body


async def _translated(
    lines: AsyncGenerator[Any, None],
    translator: chat.ChatStreamTranslator | completions.CompletionStreamTranslator,
    backend: str,
    call: Call,
) -> AsyncGenerator[dict[str, Any], None]:
    """
    Feed native NDJSON lines to a stream translator and yield its chunks;
    at the end, ``call.on_usage`` hears the usage of Ollama's ``done`` line.

    A stream that ends without that line was cut short: say so rather than
    let the client believe the answer is complete.  Either way (the client
    left, the backend failed), ``call.on_cut_short`` hears how many tokens
    were generated: Ollama streams one token a line.
    """
    feed = translator.feed
    generated = 0
    try:
        async with aclosing(lines):
            async for line in lines:
                if not isinstance(line, dict):
                    continue
                if line.get("done") is not True:
                    generated += 1
                for chunk in feed(line):
                    yield chunk
        if not translator.done:
            raise UpstreamError(f"backend {backend!r} ended the stream before it was complete")
    finally:
        if not translator.done and generated:
            call.on_cut_short(generated)
    call.on_usage(translator.usage or {})


async def _with_usage_chunk(
    chunks: AsyncGenerator[dict[str, Any], None],
    translator: completions.CompletionStreamTranslator,
    completion_id: str,
    call: Call,
) -> AsyncGenerator[dict[str, Any], None]:
    """The chunks, then the usage chunk ``stream_options.include_usage`` asks for."""
    async with aclosing(chunks):
        async for chunk in chunks:
            yield chunk
    yield completions.completion_usage_chunk(
        completion_id=completion_id,
        model=call.client_model,
        created=call.created,
        usage=translator.usage or combined_usage(()),
    )
