"""
What every upstream adapter offers the API layer.

The API layer speaks OpenAI on both sides of this line: an adapter takes an
OpenAI request body and returns OpenAI response objects (or an iterator of
stream chunks), whatever it has to say to its own server in between.
What a backend can do besides (speak Ollama's native API, manage models,
take runtime options...) it declares with capability interfaces, which the
callers ask about instead of asking what kind of server it is.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from zope.interface import Interface

from oproxy.upstream import Upstream, UpstreamTime


@dataclass(frozen=True)
class Call:
    """
    One request as routed: the names it needs and what the proxy fetched for it.

    :ivar client_model: the model name as the client sent it, echoed back.
    :ivar upstream_model: the name the backend knows the model by.
    :ivar created: the response's ``created`` timestamp (unix seconds).
    :ivar images: a chat's images made ready by the proxy, as base64, by URL:
        http(s) URLs fetched, data URLs in formats Ollama cannot read converted.
    :ivar upstream_time: where the backend adds the time it waited upstream.
    :ivar on_usage: told the token counts once the backend has given them,
        streams included, so that accounting never depends on the client
        asking for a usage chunk.
    :ivar on_cut_short: told how many completion tokens a stream generated
        when it ends without the backend's usage (the client left, or the
        backend failed midway), so that what was generated is still counted.
    """

    client_model: str
    upstream_model: str
    created: int
    images: Mapping[str, str] = field(default_factory=dict)
    on_usage: Callable[[Mapping[str, int]], None] = lambda usage: None
    on_cut_short: Callable[[int], None] = lambda generated: None
    upstream_time: UpstreamTime = field(default_factory=UpstreamTime)


class IBackend(Interface):
    """
    An upstream model server, seen through the OpenAI API.

    What a backend can do beyond that is said by the capability interfaces
    below, which it declares with ``@implementer``; callers ask
    ``ICapability.providedBy(backend)`` rather than which kind it is, so a
    new kind of server says what it can do in one place.
    """

    #: Its share of requests when several backends serve a model.
    weight: int
    #: The name the configuration gives it (labels, logs, ``x-oproxy-backend``).
    name: str
    #: The configuration's ``type`` (``ollama``, ``vllm``...), for people to
    #: read (``/v1/health``, the console); never for deciding what it can do.
    kind: str

    async def chat_completion(call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        """One chat completion, as OpenAI's object."""

    async def chat_completion_stream(
        call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streamed chat completion's chunks, once the first can come."""

    async def completion(call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        """One legacy completion, as OpenAI's object."""

    async def completion_stream(
        call: Call, body: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streamed legacy completion's chunks."""

    async def embeddings(call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        """Embeddings, as OpenAI's list object."""

    async def list_models() -> list[dict[str, Any]]:
        """The models the server has, as OpenAI's model objects."""

    async def retrieve_model(model_id: str) -> dict[str, Any]:
        """One model, as OpenAI's model object."""

    async def probe() -> dict[str, Any]:
        """
        A cheap health probe that never runs a completion: ``version``,
        ``models_available`` and ``models_loaded`` where the server tells,
        and ``details``, what else the server's own health routes said
        (slots, queue depth, context size), shown in ``/v1/health``.
        """

    async def describe_models() -> list[ModelInfo]:
        """
        What the server says about each of its models beyond an OpenAI
        model object (size, family, context length, whether it is loaded),
        for people: the console's model page.  What a server does not say
        is ``None``.
        """


@dataclass(frozen=True)
class ModelInfo:
    """
    One model as its server describes it, in the same terms whatever the
    server: :meth:`IBackend.describe_models` answers with these.

    :ivar id: the name requests use, as in ``/v1/models``.
    :ivar kind: what it does: ``llm``, ``vlm`` (reads images) or ``embeddings``.
    :ivar family: its architecture (``llama``, ``qwen2``...).
    :ivar size: bytes, on disk or in memory as the server counts them.
    :ivar parameters: how many, as the server writes it (``8B``, ``8030261312``).
    :ivar quantization: ``Q4_K_M``, ``4bit``, ``float16``...
    :ivar context_length: the most tokens it takes (prompt and answer).
    :ivar loaded: whether it is in memory now; ``None`` when the server does
        not say (a hosted API).
    """

    id: str
    kind: str | None = None
    family: str | None = None
    size: int | None = None
    parameters: str | None = None
    quantization: str | None = None
    context_length: int | None = None
    loaded: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """Every field by its name: what the console's model page is sent."""
        return asdict(self)


@dataclass(frozen=True)
class Load:
    """
    How busy a server says it is.

    :ivar running: requests it is generating for now.
    :ivar waiting: requests queued behind them.
    :ivar slots: how many it can run at once, when it has a fixed number.
    """

    running: int
    waiting: int = 0
    slots: int | None = None

    @property
    def requests(self) -> int:
        """Everything it has on its plate: running and waiting."""
        return self.running + self.waiting


# -- capabilities ---------------------------------------------------------------


class INativeOllama(IBackend):
    """
    Speaks Ollama's native API (``/api/chat``, ``/api/tags``...): the
    proxy's own ``/api/*`` routes pass requests through to it as they are.
    """

    #: The HTTP client to the server, for native requests passed through.
    upstream: Upstream


class IModelManagement(INativeOllama):
    """
    Holds models that clients may change through the native management
    routes (``/api/pull``, ``/api/push``, ``/api/create``, ``/api/copy``,
    ``/api/delete``), sent through :attr:`INativeOllama.upstream`.
    """


class IImplicitLatest(IBackend):
    """
    Reads a model name without a tag as its ``:latest``: ``llama3.2`` and
    ``llama3.2:latest`` are one model (and one circuit) there.
    """


class IRuntimeOptions(IBackend):
    """
    Takes runtime options (``num_ctx``, ``top_k``...) under a request's
    ``options``: a model's configured defaults that are not OpenAI fields
    go there rather than being dropped.
    """


class IInlineImages(IBackend):
    """
    Reads images only inline, and only in the formats it decodes: the proxy
    fetches a chat's image URLs and converts them before calling it.
    """


class ILoadedModels(IBackend):
    """
    Tells which of its models are in memory now (Ollama's ``/api/ps``, LM
    Studio's ``state``): ``prefer-warm`` routing sends a model's requests
    where it is loaded, and so spares a load.
    """

    async def loaded_models() -> list[str]:
        """The names of the models loaded now."""


class IBusyness(IBackend):
    """
    Tells how busy it is (vLLM's queue depth, llama.cpp's slots):
    ``least-busy`` routing counts the requests other clients gave it, not
    only the proxy's own.
    """

    async def load() -> Load:
        """Its load now, read from the server (a cheap read, never a completion)."""


class IModelLoading(IBackend):
    """
    Loads and unloads a model on request (LM Studio's load and unload
    routes, Ollama's ``keep_alive``), for ``/admin/models/load`` and
    ``/admin/models/unload``.
    """

    async def load_model(model: str) -> None:
        """Load ``model`` into memory and return once it is loaded."""

    async def unload_model(model: str) -> None:
        """Take ``model`` out of memory."""


class IModelSuffixes(IBackend):
    """
    Takes model names with a suffix its listing does not show (Inference
    Providers' ``org/model:provider``, ``org/model:cheapest``): routing asks
    which listed model such a name is.
    """

    def listed_as(model: str) -> str:
        """The name ``model`` is listed under (itself when it has no suffix)."""


class ISamplingFields(IBackend):
    """
    Takes sampling fields beyond OpenAI's at the top level of a request
    (llama.cpp's ``top_k``, ``min_p``, ``repeat_penalty``; vLLM's
    ``repetition_penalty``): a model's configured ``options`` that are
    among them are sent there rather than dropped.
    """

    #: The names of those fields.
    sampling_fields: frozenset[str]
