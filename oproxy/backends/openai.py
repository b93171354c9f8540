"""
The OpenAI-compatible adapter: vLLM, llama.cpp's server, LM Studio, TGI,
OpenAI itself and the hosted APIs that copy it.

Requests pass through with as little rewriting as possible: the model name
becomes the one the backend knows, a stream always asks the backend for its
usage (so accounting never depends on the client asking), and the proxy's
own key for the backend is sent instead of anything the client sent.  On the
way back the client's model name is put in every answer and chunk, and the
usage-only chunk the proxy asked for is dropped unless the client asked too.
Upstream errors become the project's typed errors, so that a router can tell
"try another backend" (unreachable, busy, timed out) from "the request is
wrong" before the first byte has gone to the client.

Each call is one generation: ``n`` and prompt lists are fanned out by
:mod:`oproxy.api.choices` before they get here, as for Ollama, because
several of these servers (LM Studio, llama.cpp's server) ignore ``n`` and
would answer with fewer choices than asked for, and because one request's
concurrency on the backend stays bounded the same way everywhere.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from attrs import evolve
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from oproxy.backends.base import Call, IBackend, ModelInfo
from oproxy.config import BackendConfig
from oproxy.errors import (
    InvalidRequest,
    ModelNotFound,
    OProxyError,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
)
from oproxy.translate.common import raise_for_upstream_error, token_count, wants_usage_chunk
from oproxy.translate.embeddings import float32_base64
from oproxy.upstream import Upstream

#: Characters left as they are in a model id put in a URL path, as the
#: official SDK does (``hf.co/u/m:q4`` → ``hf.co%2Fu%2Fm:q4``).
_PATH_SAFE = "!$&'()*+,;=:@"


@dataclass(frozen=True)
class BaseURL:
    """
    Where a backend's API lives.

    :ivar origin: ``scheme://host[:port]``, what the connection pool keys on.
    :ivar api: the path the API routes hang from, e.g. ``/v1``.
    :ivar health: the path of the server's ``/health``, if it has one.
    :ivar root: the path the server's own routes hang from (``/props``,
        ``/info``, ``/api/v0``...): the API root less a final ``/v1``.
    """

    origin: str
    api: str
    health: str
    root: str = ""


def split_base_url(url: str) -> BaseURL:
    """
    Read a backend ``url`` that may or may not name the API root.

    * A URL without a path (``http://host:8000``) is the server: the API is
      under ``/v1``, as on vLLM, llama.cpp, LM Studio and TGI.
    * A URL with a path is the API root itself, exactly what an OpenAI SDK
      takes as ``base_url``: ``http://host:1234/v1``,
      ``https://api.groq.com/openai/v1``, or one without ``/v1`` such as
      ``https://generativelanguage.googleapis.com/v1beta/openai``.

    A trailing slash is ignored.  ``/health`` is looked for at the API root
    less a final ``/v1`` (``http://host:8000/health``), where the servers
    that have one serve it.

    :raises ValueError: for a URL the adapter cannot use; credentials belong
        in the backend's ``api_key``, not in the URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"backend url {url!r} is not an http(s) URL with a host")
    if parts.username or parts.password:
        raise ValueError(f"backend url {url!r} holds credentials; use api_key instead")
    if parts.query or parts.fragment:
        raise ValueError(f"backend url {url!r} must not have a query or fragment")
    api = parts.path.rstrip("/") or "/v1"
    root = api.removesuffix("/v1") if api.endswith("/v1") else api
    return BaseURL(
        origin=f"{parts.scheme}://{parts.netloc}", api=api, health=root + "/health", root=root
    )


@implementer(IBackend)
class OpenAIBackend:
    """
    A server that speaks the OpenAI API, spoken to in that same API.

    :param config: the backend's name, ``url`` (see :func:`split_base_url`),
        ``host_header`` and timeouts.
    :param agent: the shared HTTP client (over the process's connection pool).
    :param clock: where timeouts are measured.
    :param api_key: sent upstream as ``Authorization: Bearer``; the client's
        own ``Authorization`` is never forwarded (it is the proxy's key).
    :raises ValueError: if ``config.url`` is not usable.
    """

    def __init__(
        self,
        config: BackendConfig,
        agent: IAgent,
        clock: IReactorTime,
        *,
        api_key: str | None = None,
    ) -> None:
        base = split_base_url(config.url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._upstream = Upstream(
            evolve(config, url=base.origin), agent, clock, extra_headers=headers
        )
        self._api = base.api
        self._health = base.health
        #: Where the server's own (not OpenAI) routes hang from.
        self._root = base.root
        #: Whether the server has ``/health``; unknown until the first probe.
        self._has_health: bool | None = None
        self.weight = config.weight
        self.kind = config.type

    @property
    def name(self) -> str:
        return self._upstream.name

    # ------------------------------------------------------------------
    # What a kind of server changes (see the modules beside this one)

    def adapt(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """
        The body as this server takes it, for the API route ``path``
        (``/chat/completions``...): a kind whose server reads some fields
        differently rewrites them here.  The generic server takes OpenAI's
        body as it is.
        """
        return payload

    def adapt_answer(self, path: str, answer: dict[str, Any]) -> None:
        """Mend, in place, what this server leaves out of a whole answer."""

    def adapt_stream(
        self, chunks: AsyncGenerator[dict[str, Any], None]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A stream's chunks as OpenAI words them, where this server does not."""
        return chunks

    # ------------------------------------------------------------------
    # Generation

    async def chat_completion(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._answer("/chat/completions", call, body)

    async def chat_completion_stream(
        self, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        return await self._stream("/chat/completions", call, body)

    async def completion(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._answer("/completions", call, body)

    async def completion_stream(
        self, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        return await self._stream("/completions", call, body)

    async def embeddings(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        answer = await self._answer("/embeddings", call, body)
        if body.get("encoding_format") == "base64":
            _encode_as_base64(answer)
        return answer

    async def _answer(self, path: str, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        payload = self.adapt(path, upstream_body(body, call.upstream_model, stream=False))
        status, headers, answer = await self._upstream.send_json(
            "POST", self._api + path, payload, call.upstream_time
        )
        if status != 200:
            raise self.error(status, answer, headers, model=call.client_model)
        if not isinstance(answer, dict):
            raise UpstreamError(f"backend {self.name!r} sent an answer that is not a JSON object")
        raise_for_upstream_error(answer)
        self.adapt_answer(path, answer)
        answer["model"] = call.client_model
        usage = reported_usage(answer.get("usage"))
        if usage is not None:
            call.on_usage(usage)
        return answer

    async def _stream(
        self, path: str, call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        client_wants_usage = wants_usage_chunk(body)
        payload = self.adapt(path, upstream_body(body, call.upstream_model, stream=True))
        status, headers, events = await self._upstream.stream_events(
            self._api + path, payload, call.upstream_time
        )
        if status != 200:
            async with aclosing(events):
                answer = await anext(events, None)
            raise self.error(status, answer, headers, model=call.client_model)
        return self.adapt_stream(relayed(events, call, include_usage=client_wants_usage))

    def error(
        self, status: int, body: object, headers: Headers, *, model: str | None = None
    ) -> OProxyError:
        """The error a client sees for this server's error answer (:func:`upstream_error`)."""
        return upstream_error(status, body, headers, self.name, model=model)

    async def get_json(self, path: str) -> Any:
        """
        ``GET`` one of the server's JSON routes (a full path); an error
        answer raises the error the client would see.
        """
        status, headers, body = await self._upstream.send_json("GET", path)
        if status != 200:
            raise self.error(status, body, headers)
        return body

    async def metrics_page(self) -> bytes:
        """
        The server's Prometheus ``/metrics`` page, where vLLM and TGI say
        how busy they are; an error answer raises the error the client
        would see.
        """
        status, headers, raw = await self._upstream.get_bytes(self._root + "/metrics")
        if status != 200:
            raise self.error(status, {"error": raw[:200].decode("utf-8", "replace")}, headers)
        return raw

    # ------------------------------------------------------------------
    # Models and health

    async def list_models(self) -> list[dict[str, Any]]:
        return await self.openai_models()

    async def openai_models(self) -> list[dict[str, Any]]:
        """The server's own ``/v1/models``, each model made valid and ``owned_by`` this backend."""
        status, headers, body = await self._upstream.send_json("GET", self._api + "/models")
        if status != 200:
            raise self.error(status, body, headers)
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list):
            raise UpstreamError(f"backend {self.name!r} listed its models in an unknown shape")
        return [self._model(entry) for entry in data if _model_id(entry) is not None]

    async def retrieve_model(self, model_id: str) -> dict[str, Any]:
        path = f"{self._api}/models/{quote(model_id, safe=_PATH_SAFE)}"
        status, headers, body = await self._upstream.send_json("GET", path)
        if status == 200 and _model_id(body) is not None:
            return self._model(body)
        if status not in (200, 404, 405):
            raise self.error(status, body, headers, model=model_id)
        # Not there, or a server without this route (llama.cpp): the listing decides.
        for model in await self.list_models():
            if model["id"] == model_id:
                return model
        raise ModelNotFound(model_id)

    async def probe(self) -> dict[str, Any]:
        """
        ``GET /health`` where the server has it (vLLM, llama.cpp, TGI), else
        ``GET /v1/models`` (LM Studio, hosted APIs): never a completion, so a
        health check costs no GPU time and no money.
        """
        if self._has_health is not False:
            status, headers, body = await self._upstream.send_json("GET", self._health)
            if status == 200:
                self._has_health = True
                return {"version": None, "models_available": None, "models_loaded": []}
            if status not in (404, 405):
                raise self.error(status, body, headers)
            self._has_health = False
        models = await self.list_models()
        return {"version": None, "models_available": len(models), "models_loaded": []}

    async def describe_models(self) -> list[ModelInfo]:
        """
        What a generic server's listing says: the names, and a context
        length where it gives one (vLLM's ``max_model_len``); nothing of
        memory, which such a server does not tell.
        """
        return [
            ModelInfo(id=entry["id"], context_length=whole_number(entry.get("max_model_len")))
            for entry in await self.list_models()
        ]

    def _model(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """
        One model as the API serves it: the backend's own fields, with the
        four OpenAI requires made valid and ``owned_by`` naming the backend
        (as the Ollama adapter does), so a listing across backends tells
        where each model lives.
        """
        created = entry.get("created")
        return {
            **entry,
            "object": "model",
            "created": token_count(created),
            "owned_by": self.name,
        }


# --------------------------------------------------------------------------
# Requests and answers


def upstream_body(body: Mapping[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """
    The client's body as the backend gets it: its model name, and for a
    stream ``stream_options.include_usage`` set, whatever the client asked.

    :raises InvalidRequest: if ``stream_options`` is malformed.
    """
    payload = dict(body)
    payload["model"] = model
    if stream:
        wants_usage_chunk(body)  # validates stream_options
        options = body.get("stream_options")
        payload["stream"] = True
        payload["stream_options"] = {**(options or {}), "include_usage": True}
    return payload


async def relayed(
    events: AsyncGenerator[Any, None], call: Call, *, include_usage: bool
) -> AsyncGenerator[dict[str, Any], None]:
    """
    Pass a backend's stream chunks on, as the client asked for them.

    The usage the backend reports is given to ``call.on_usage`` once the
    stream ends, or when it is abandoned after the usage came; a stream cut
    short before that reports the chunks that carried generated text to
    ``call.on_cut_short`` (OpenAI-compatible servers stream about a token a
    chunk), so what was generated is still counted.  An in-band
    ``{"error": ...}`` event (vLLM, sglang) is raised, so the client gets an
    error event rather than a stream that looks complete.
    """
    usage: dict[str, int] | None = None
    generated = 0
    try:
        async with aclosing(events):
            async for chunk in events:
                if not isinstance(chunk, dict):
                    raise UpstreamError("the backend sent an event that is not a JSON object")
                raise_for_upstream_error(chunk)
                usage = reported_usage(chunk.get("usage")) or usage
                if any(_generated_text(choice) for choice in chunk.get("choices") or ()):
                    generated += 1
                chunk["model"] = call.client_model
                if not include_usage:
                    if chunk.get("usage") is not None and not chunk.get("choices"):
                        continue  # the usage chunk the proxy asked for, not the client
                    chunk.pop("usage", None)
                yield chunk
    finally:
        if usage is not None:
            call.on_usage(usage)
        elif generated:
            call.on_cut_short(generated)


def _generated_text(choice: Any) -> bool:
    """Whether a stream choice carries generated text (chat delta or completion text)."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        )
    return bool(choice.get("text"))


def reported_usage(value: object) -> dict[str, int] | None:
    """
    Token counts from an OpenAI ``usage`` object, or ``None`` when there is
    none: an unknown count is better left unknown than recorded as zero.
    """
    if not isinstance(value, Mapping):
        return None
    prompt = token_count(value.get("prompt_tokens"))
    completion = token_count(value.get("completion_tokens"))
    total = token_count(value.get("total_tokens")) or prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _encode_as_base64(answer: dict[str, Any]) -> None:
    """
    Encode, as asked, vectors a backend sent as floats anyway.

    Some servers ignore ``encoding_format``; the SDK, which asks for base64
    by default, would then be handed lists where it expects strings.
    """
    for item in answer.get("data") or ():
        if isinstance(item, dict) and isinstance(item.get("embedding"), list):
            item["embedding"] = float32_base64(item["embedding"])


def whole_number(value: object) -> int | None:
    """A count a server gave, if it is one (not a boolean, not negative)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _model_id(entry: object) -> str | None:
    if isinstance(entry, Mapping):
        model_id = entry.get("id")
        if isinstance(model_id, str) and model_id:
            return model_id
    return None


# --------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ErrorDetails:
    """What a backend said about an error, from any of the shapes in use."""

    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | None = None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def error_details(body: object) -> ErrorDetails:
    """
    Read an error body: OpenAI's ``{"error": {...}}``, vLLM's older bare
    ``{"object": "error", "message": ...}``, or ``{"error": "..."}`` (TGI,
    non-JSON bodies as :mod:`oproxy.upstream` decodes them).
    """
    if not isinstance(body, Mapping):
        return ErrorDetails()
    error = body.get("error")
    if isinstance(error, str):
        return ErrorDetails(message=_text(error))
    source = error if isinstance(error, Mapping) else body
    return ErrorDetails(
        message=_text(source.get("message")),
        type=_text(source.get("type")),
        param=_text(source.get("param")),
        code=_text(source.get("code")),
    )


def _retry_headers(headers: Headers) -> dict[str, str]:
    """The backend's advice on when to retry, passed on if it is a number."""
    advice = {}
    for name in ("Retry-After", "Retry-After-Ms"):
        values = headers.getRawHeaders(name)
        if values:
            value = values[0].strip()
            try:
                seconds = float(value)
            except ValueError:
                continue
            if seconds >= 0:
                advice[name] = value
    return advice


def _about_model(details: ErrorDetails) -> bool:
    return (
        details.code == "model_not_found"
        or details.param == "model"
        or "model" in (details.message or "").lower()
    )


def upstream_error(
    status: int,
    body: object,
    headers: Headers,
    backend: str,
    *,
    model: str | None = None,
) -> OProxyError:
    """
    The error the client should see for a backend's error answer.

    The client's mistakes (400, 422, an unknown ``model``) keep the
    backend's message, ``param`` and ``code``.  A refused key is the
    operator's problem, not the client's: a 502 that names the backend and
    not the backend's message, which may quote part of the key.  Rate limits
    and overload become :class:`UpstreamBusy` with the backend's
    ``Retry-After``; a router may try another backend on that.

    :param model: the model as the client named it, for a request about one;
        ``None`` for listings and probes, where a 404 means a wrong URL.
    """
    details = error_details(body)
    message = details.message or f"backend {backend!r} answered HTTP {status}"
    if status == 404 and model is not None and _about_model(details):
        return ModelNotFound(model)
    if status in (400, 413, 422):
        return InvalidRequest(message, param=details.param, code=details.code)
    if status in (401, 403):
        return UpstreamError(
            f"backend {backend!r} refused the proxy's credentials (HTTP {status}); "
            "check the api_key configured for it"
        )
    if status == 404:
        return UpstreamError(
            f"backend {backend!r} does not serve this endpoint (HTTP 404: {message}); "
            "check that its url points at the server or its OpenAI API root"
        )
    if status == 429 and "insufficient_quota" in (details.code, details.type):
        return UpstreamError(f"backend {backend!r} is out of quota: {message}")
    if status in (429, 503):
        return UpstreamBusy(message, headers=_retry_headers(headers))
    if status in (408, 504):
        return UpstreamTimeout(f"backend {backend!r} timed out (HTTP {status}): {message}")
    return UpstreamError(f"backend {backend!r} failed (HTTP {status}): {message}")
