"""
What each backend kind knows of its server beyond the OpenAI API: how it
lists, probes and describes its models, the request fields its server
reads differently, and what its server does not serve; against each
kind's fake on loopback, directly and through the proxy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from oproxy.backends.base import (
    Call,
    IBackend,
    IBusyness,
    ILoadedModels,
    IModelLoading,
    IModelSuffixes,
    ISamplingFields,
    Load,
    ModelInfo,
)
from oproxy.backends.kinds import KINDS, build_backend
from oproxy.config import (
    APIKey,
    AuthConfig,
    BackendConfig,
    ConfigError,
    ModelRule,
    RoutingConfig,
    load_config,
)
from oproxy.config.schema import BACKEND_TYPES
from oproxy.errors import InvalidRequest, UpstreamBusy, UpstreamError
from oproxy.security.keys import hash_key
from oproxy.security.policy import KeyPolicy
from oproxy.testing.base.server import Route
from oproxy.testing.huggingface import FakeHuggingFaceRouter
from oproxy.testing.llamacpp import FakeLlamaCpp
from oproxy.testing.lmstudio import FakeLMStudio
from oproxy.testing.openai import BROKEN_MESSAGE, FakeOpenAI, FakeOpenAIModel
from oproxy.testing.tei import FakeTEI
from oproxy.testing.tgi import FakeTGI
from oproxy.testing.vllm import FakeVLLM
from tests.conftest import Proxy, listen
from tests.httputil import post_json, sse_events
from tests.openai_schema import assert_valid

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
ADMIN = "sk-admin-0123456789"


def test_every_configured_type_has_a_kind() -> None:
    assert set(BACKEND_TYPES) == set(KINDS)


@pytest.fixture
def serve() -> Iterator[Any]:
    """Serve a fake on loopback; build the adapter of a kind for it."""
    ports: list[Any] = []
    pool = HTTPConnectionPool(reactor, persistent=True)

    def start(fake: FakeOpenAI, kind: str, path: str = "", **config: Any) -> IBackend:
        running = listen(Site(fake.resource()))
        ports.append(running.port)
        backend = BackendConfig(name=kind, type=kind, url=running.url + path, **config)
        return build_backend(backend, Agent(reactor, pool=pool), reactor)

    yield start
    pytest_twisted.blockon(pool.closeCachedConnections())
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def call(model: str) -> Call:
    return Call(client_model=model, upstream_model=model, created=1)


def sent(fake: FakeOpenAI, path: str) -> Any:
    bodies = [r.body for r in fake.stats.requests if r.path == path]
    assert bodies, f"nothing was sent to {path}"
    return bodies[-1]


@pytest.fixture
def behind(proxy_factory: Any) -> Iterator[Any]:
    """A proxy with a kind's fake as its one backend."""
    ports: list[Any] = []

    def start(fake: FakeOpenAI, kind: str, path: str = "", **extra: Any) -> Proxy:
        running = listen(Site(fake.resource()))
        ports.append(running.port)
        config = extra.pop("backend", {})
        backend = BackendConfig(name=kind, type=kind, url=running.url + path, **config)
        proxy: Proxy = proxy_factory(backends=(backend,), **extra)
        return proxy

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


# --------------------------------------------------------------------------
# LM Studio


@pytest_twisted.ensureDeferred
async def test_lmstudio_lists_every_downloaded_model_with_its_state(serve: Any) -> None:
    fake = FakeLMStudio(reactor, jit=False)  # its /v1/models lists only what is loaded
    backend = serve(fake, "lmstudio", "/v1")
    models = {m["id"]: m for m in await backend.list_models()}
    assert set(models) == set(fake.catalogue)
    assert models["qwen2-vl-2b-instruct"]["type"] == "vlm"
    assert models["qwen2.5-7b-instruct"]["state"] == "loaded"
    assert models["llama-3.2-3b-instruct"]["state"] == "not-loaded"
    for model in models.values():
        assert_valid("Model", model)
        assert model["owned_by"] == "lmstudio"
    assert await backend.loaded_models() == ["qwen2.5-7b-instruct"]
    probed = await backend.probe()
    assert probed["models_loaded"] == ["qwen2.5-7b-instruct"]
    assert probed["models_available"] == len(fake.catalogue)
    assert "/health" not in [r.path for r in fake.stats.requests]


class OlderLMStudio(FakeLMStudio):
    """An LM Studio before 0.3.6: no REST API, so 200 "Unexpected endpoint"."""

    def routes(self) -> list[Route]:
        return [r for r in super().routes() if not r[0].startswith("/api/")]


@pytest_twisted.ensureDeferred
async def test_an_older_lmstudio_is_listed_from_its_openai_route(serve: Any) -> None:
    fake = OlderLMStudio(reactor)
    backend = serve(fake, "lmstudio")
    models = await backend.list_models()
    assert {m["id"] for m in models} == set(fake.catalogue)
    assert await backend.loaded_models() == []
    described = await backend.describe_models()
    assert {d.id for d in described} == set(fake.catalogue)
    assert all(d.loaded is None for d in described)


@pytest_twisted.ensureDeferred
async def test_lmstudio_describes_its_models(serve: Any) -> None:
    backend = serve(FakeLMStudio(reactor), "lmstudio")
    described = {d.id: d for d in await backend.describe_models()}
    assert described["qwen2.5-7b-instruct"] == ModelInfo(
        id="qwen2.5-7b-instruct",
        kind="llm",
        family="qwen2",
        size=4_920_734_720,
        parameters="7B",
        quantization="Q4_K_M",
        context_length=32768,
        loaded=True,
    )
    embed = described["text-embedding-nomic-embed-text-v1.5"]
    assert (embed.kind, embed.loaded, embed.parameters) == ("embeddings", False, None)


@pytest_twisted.ensureDeferred
async def test_lmstudio_loads_and_unloads(serve: Any) -> None:
    fake = FakeLMStudio(reactor, loaded=[])
    backend = serve(fake, "lmstudio")
    await backend.load_model("llama-3.2-3b-instruct")
    assert fake.loaded == {"llama-3.2-3b-instruct"}
    assert await backend.loaded_models() == ["llama-3.2-3b-instruct"]
    await backend.unload_model("llama-3.2-3b-instruct")
    assert fake.loaded == set()
    assert sent(fake, "/api/v1/models/unload") == {"instance_id": "llama-3.2-3b-instruct"}


@pytest_twisted.ensureDeferred
async def test_lmstudio_streams_without_usage_when_it_is_too_old(serve: Any) -> None:
    fake = FakeLMStudio(reactor, stream_usage=False)
    backend = serve(fake, "lmstudio")
    cut: list[int] = []
    routed = Call(
        client_model="m",
        upstream_model="qwen2.5-7b-instruct",
        created=1,
        on_cut_short=cut.append,
    )
    body = {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    chunks = [c async for c in await backend.chat_completion_stream(routed, body)]
    assert all(c["choices"] for c in chunks)
    assert cut and cut[0] > 0  # what was generated is still counted


@pytest_twisted.ensureDeferred
async def test_models_are_loaded_and_unloaded_by_admins(behind: Any) -> None:
    fake = FakeLMStudio(reactor, loaded=[])
    auth = AuthConfig(keys=(APIKey(name="root", sha256=hash_key(ADMIN)),))
    proxy = behind(fake, "lmstudio", auth=auth)
    url = f"{proxy.url}/admin/models/load"
    body = {"model": "llama-3.2-3b-instruct"}
    response, raw = await post_json(proxy.client, url, body, {"Authorization": f"Bearer {ADMIN}"})
    assert response.code == 403, raw  # an admin key is needed
    admin = AuthConfig(keys=(APIKey(name="root", sha256=hash_key(ADMIN), policy=_admin_policy()),))
    proxy = behind(fake, "lmstudio", auth=admin)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    response, raw = await post_json(proxy.client, f"{proxy.url}/admin/models/load", body, headers)
    assert response.code == 200, raw
    assert orjson.loads(raw) == {
        "object": "model.action",
        "action": "load",
        "model": "llama-3.2-3b-instruct",
        "backends": ["lmstudio"],
    }
    assert fake.loaded == {"llama-3.2-3b-instruct"}
    assert proxy.app.router.state.catalog.loaded("lmstudio", "llama-3.2-3b-instruct")
    response, raw = await post_json(proxy.client, f"{proxy.url}/admin/models/unload", body, headers)
    assert response.code == 200, raw
    assert fake.loaded == set()
    assert not proxy.app.router.state.catalog.loaded("lmstudio", "llama-3.2-3b-instruct")
    response, raw = await post_json(
        proxy.client, f"{proxy.url}/admin/models/load", {"model": "nope"}, headers
    )
    assert response.code == 404, raw


@pytest_twisted.ensureDeferred
async def test_a_backend_that_cannot_load_models_says_so(behind: Any) -> None:
    admin = AuthConfig(keys=(APIKey(name="root", sha256=hash_key(ADMIN), policy=_admin_policy()),))
    proxy = behind(FakeVLLM(reactor), "vllm", auth=admin)
    response, raw = await post_json(
        proxy.client,
        f"{proxy.url}/admin/models/load",
        {"model": "Qwen/Qwen2.5-7B-Instruct"},
        {"Authorization": f"Bearer {ADMIN}"},
    )
    assert response.code == 400, raw
    assert orjson.loads(raw)["error"]["code"] == "unsupported_backend"


def _admin_policy() -> KeyPolicy:
    return KeyPolicy(admin=True)


# --------------------------------------------------------------------------
# llama.cpp


@pytest_twisted.ensureDeferred
async def test_llamacpp_probe_reports_loading_then_its_props(serve: Any) -> None:
    fake = FakeLlamaCpp(reactor, loading=True, slots=2, n_ctx=8192)
    backend = serve(fake, "llamacpp")
    with pytest.raises(UpstreamBusy, match="Loading model"):
        await backend.probe()
    (listed,) = await backend.list_models()  # /v1/models answers while loading
    assert listed["meta"] is None
    assert (await backend.describe_models())[0].loaded is False
    fake.finish_loading()
    probed = await backend.probe()
    assert probed["version"] == "b6500-fakefake"
    assert probed["models_loaded"] == [fake.model.id]
    assert probed["details"]["context_length"] == 8192
    assert probed["details"]["slots"] == 2
    (described,) = await backend.describe_models()
    assert (described.context_length, described.size, described.loaded) == (8192, 4677120000, True)


@pytest_twisted.ensureDeferred
async def test_llamacpp_load_is_its_busy_slots(serve: Any) -> None:
    fake = FakeLlamaCpp(reactor, slots=4)
    fake.busy_elsewhere = 3
    backend = serve(fake, "llamacpp")
    assert await backend.load() == Load(running=3, slots=4)
    fake.slots_endpoint, fake.metrics = False, True  # --no-slots --metrics
    fake.busy_elsewhere = 6
    assert await backend.load() == Load(running=4, waiting=2)
    fake.metrics = False
    with pytest.raises(UpstreamError, match="--slots or --metrics"):
        await backend.load()


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_llamacpp_echo_is_done_by_the_proxy(serve: Any, stream: bool) -> None:
    fake = FakeLlamaCpp(reactor)
    backend = serve(fake, "llamacpp")
    body = {"prompt": "Once upon", "echo": True, "max_tokens": 2, "stream": stream}
    if stream:
        chunks = [c async for c in await backend.completion_stream(call("m"), body)]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    else:
        text = (await backend.completion(call("m"), body))["choices"][0]["text"]
    assert text == "Once upon" + "You said:"  # the prompt, then what was generated
    assert "echo" not in sent(fake, "/v1/completions")


@pytest_twisted.ensureDeferred
async def test_llamacpp_refuses_a_suffix_before_sending(serve: Any) -> None:
    fake = FakeLlamaCpp(reactor)
    backend = serve(fake, "llamacpp")
    with pytest.raises(InvalidRequest) as caught:
        await backend.completion(call("m"), {"prompt": "def f(", "suffix": "return x"})
    assert caught.value.param == "suffix"
    assert not [r for r in fake.stats.requests if r.path == "/v1/completions"]


@pytest_twisted.ensureDeferred
async def test_llamacpp_with_a_key(serve: Any) -> None:
    fake = FakeLlamaCpp(reactor, api_key="llama-key")
    backend = serve(fake, "llamacpp", api_key="llama-key")
    answer = await backend.chat_completion(call("m"), {"messages": HELLO})
    assert answer["choices"][0]["message"]["content"]
    wrong = serve(fake, "llamacpp", api_key="other")
    with pytest.raises(UpstreamError, match="api_key"):
        await wrong.chat_completion(call("m"), {"messages": HELLO})


# --------------------------------------------------------------------------
# vLLM


@pytest_twisted.ensureDeferred
async def test_vllm_probe_and_load_from_its_metrics(serve: Any) -> None:
    fake = FakeVLLM(reactor)
    fake.running_elsewhere, fake.waiting = 3, 7
    backend = serve(fake, "vllm", "/v1")
    assert await backend.load() == Load(running=3, waiting=7)
    probed = await backend.probe()
    assert probed["version"] == "0.11.0"
    assert probed["details"] == {"requests_running": 3, "requests_waiting": 7}
    (described,) = await backend.describe_models()
    assert (described.id, described.context_length) == ("Qwen/Qwen2.5-7B-Instruct", 32768)
    fake.dead = True
    with pytest.raises(UpstreamBusy):
        await backend.probe()


@pytest_twisted.ensureDeferred
async def test_vllm_refusal_of_auto_tool_choice_reaches_the_client(behind: Any) -> None:
    fake = FakeVLLM(reactor, auto_tool_choice=False)
    proxy = behind(fake, "vllm")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"model": "Qwen/Qwen2.5-7B-Instruct", "messages": HELLO, "tools": [tool]}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 400
    assert "--enable-auto-tool-choice" in orjson.loads(raw)["error"]["message"]


# --------------------------------------------------------------------------
# TGI


@pytest.mark.parametrize(
    ("given", "sent_as"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}}},
            {"type": "json_schema", "value": {"name": "city", "schema": {"type": "object"}}},
        ),
        ({"type": "json_object"}, {"type": "json", "value": {"type": "object"}}),
        ({"type": "text"}, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_tgi_reads_its_own_response_format(serve: Any, given: Any, sent_as: Any) -> None:
    fake = FakeTGI(reactor)
    backend = serve(fake, "tgi")
    body = {"messages": HELLO, "response_format": given}
    answer = await backend.chat_completion(call("m"), body)
    assert_valid("CreateChatCompletionResponse", answer)
    assert sent(fake, "/v1/chat/completions").get("response_format") == sent_as


@pytest_twisted.ensureDeferred
async def test_tgi_takes_openai_fields_it_would_refuse(serve: Any) -> None:
    fake = FakeTGI(reactor)
    backend = serve(fake, "tgi")
    body = {
        "messages": HELLO,
        "max_tokens": 100,
        "max_completion_tokens": 2,
        "logit_bias": {"50256": -100},
    }
    answer = await backend.chat_completion(call("m"), body)
    upstream = sent(fake, "/v1/chat/completions")
    assert upstream["max_tokens"] == 2
    assert "max_completion_tokens" not in upstream and "logit_bias" not in upstream
    assert answer["usage"]["completion_tokens"] == 2
    assert answer["id"].startswith("chatcmpl-")  # TGI leaves it empty


@pytest_twisted.ensureDeferred
async def test_tgi_model_load_and_what_it_does_not_serve(serve: Any) -> None:
    fake = FakeTGI(reactor)
    fake.queued = 5
    backend = serve(fake, "tgi")
    (model,) = await backend.list_models()
    assert (model["id"], model["max_total_tokens"]) == ("HuggingFaceH4/zephyr-7b-beta", 4096)
    assert await backend.load() == Load(running=0, waiting=5)
    probed = await backend.probe()
    assert probed["version"] == "3.3.6"
    with pytest.raises(InvalidRequest) as caught:
        await backend.embeddings(call("m"), {"input": "x"})
    assert caught.value.code == "model_not_supported"
    fake.healthy = False
    with pytest.raises(UpstreamBusy, match="unhealthy"):
        await backend.probe()


@pytest_twisted.ensureDeferred
async def test_tgi_stream_failure_is_an_error_event(behind: Any) -> None:
    fake = FakeTGI(reactor, model=FakeOpenAIModel("org/broken", broken_after=2))
    proxy = behind(fake, "tgi")
    body = {"model": "org/broken", "messages": HELLO, "stream": True}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 200
    events = sse_events(raw)
    assert "[DONE]" not in events
    last = events[-1]
    assert set(last) == {"error"}
    assert last["error"]["message"] == BROKEN_MESSAGE  # TGI's {"error": "..."} event, read
    assert_valid("ErrorResponse", last)


# --------------------------------------------------------------------------
# TEI


@pytest_twisted.ensureDeferred
async def test_tei_sends_a_long_list_in_batches(serve: Any) -> None:
    fake = FakeTEI(reactor, max_client_batch_size=32)
    backend = serve(fake, "tei")
    texts = [f"text number {i}" for i in range(40)]
    answer = await backend.embeddings(call("e"), {"input": texts})
    assert fake.batches == [32, 8]
    assert [item["index"] for item in answer["data"]] == list(range(40))
    assert answer["usage"] == {"prompt_tokens": 120, "total_tokens": 120}
    assert_valid("CreateEmbeddingResponse", {**answer, "model": "e"})
    direct = await backend.embeddings(call("e"), {"input": texts[33:35]})
    assert direct["data"][0]["embedding"] == answer["data"][33]["embedding"]


@pytest_twisted.ensureDeferred
async def test_tei_errors_and_what_it_does_not_serve(serve: Any) -> None:
    fake = FakeTEI(reactor)
    backend = serve(fake, "tei")
    with pytest.raises(InvalidRequest, match="cannot be empty"):
        await backend.embeddings(call("e"), {"input": []})
    with pytest.raises(InvalidRequest) as caught:
        await backend.chat_completion(call("e"), {"messages": HELLO})
    assert "text-embeddings-inference" in caught.value.message
    (described,) = await backend.describe_models()
    assert (described.kind, described.quantization, described.context_length) == (
        "embeddings",
        "float16",
        512,
    )
    probed = await backend.probe()
    assert probed["details"] == {"max_input_length": 512, "max_client_batch_size": 32}


# --------------------------------------------------------------------------
# Hugging Face's router


@pytest_twisted.ensureDeferred
async def test_huggingface_provider_suffixes_route(behind: Any) -> None:
    fake = FakeHuggingFaceRouter(reactor, token="hf_test_token_123456")
    proxy = behind(fake, "huggingface", "/v1", backend={"api_key": "hf_test_token_123456"})
    url = proxy.v1("chat/completions")
    for model in (
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-8B-Instruct:novita",
        "meta-llama/Llama-3.1-8B-Instruct:cheapest",
    ):
        response, raw = await post_json(proxy.client, url, {"model": model, "messages": HELLO})
        assert response.code == 200, raw
        assert orjson.loads(raw)["model"] == model
        assert sent(fake, "/v1/chat/completions")["model"] == model
    body = {"model": "meta-llama/Llama-3.1-8B-Instruct:nobody", "messages": HELLO}
    response, raw = await post_json(proxy.client, url, body)
    assert response.code == 400
    assert orjson.loads(raw)["error"]["code"] == "model_not_supported"
    response, raw = await post_json(
        proxy.client, url, {"model": "org/none:novita", "messages": HELLO}
    )
    assert response.code == 404
    response, raw = await post_json(
        proxy.client,
        proxy.v1("embeddings"),
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "input": "x"},
    )
    assert response.code == 400
    assert "chat completions only" in orjson.loads(raw)["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_huggingface_describes_its_models(serve: Any) -> None:
    backend = serve(
        FakeHuggingFaceRouter(reactor, token="hf_x_0123456789"),
        "huggingface",
        "/v1",
        api_key="hf_x_0123456789",
    )
    described = {d.id: d for d in await backend.describe_models()}
    assert described["Qwen/Qwen2.5-VL-7B-Instruct"].kind == "vlm"
    assert described["Qwen/Qwen2.5-VL-7B-Instruct"].context_length == 32768
    assert described["meta-llama/Llama-3.1-8B-Instruct"].loaded is None
    probed = await backend.probe()
    assert probed["models_available"] == len(described)


# --------------------------------------------------------------------------
# The Hugging Face token stays secret


@pytest_twisted.ensureDeferred
async def test_the_huggingface_token_is_never_logged_or_shown(behind: Any) -> None:
    token = "hf_very_secret_token_9f8e7d6c5b4a"
    fake = FakeHuggingFaceRouter(reactor, token=token)
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(f"{formatEvent(event)} {event!r}")

    globalLogPublisher.addObserver(observe)
    try:
        proxy = behind(fake, "huggingface", "/v1", backend={"api_key": token})
        url = proxy.v1("chat/completions")
        bodies = []
        body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": HELLO}
        for failure in (None, 500, 401, 429):
            if failure is not None:
                fake.fail_next(failure, f"upstream says {failure}")
            response, raw = await post_json(proxy.client, url, body)
            bodies.append(raw)
        response, raw = await post_json(proxy.client, url, {**body, "model": "org/none"})
        bodies.append(raw)
        health = await proxy.client.get(proxy.v1("health"))
        document = await health.content()
        bodies.append(document)
        listing = await proxy.client.get(proxy.v1("models"))
        bodies.append(await listing.content())
        wrong = behind(fake, "huggingface", "/v1", backend={"api_key": "hf_wrong_token"})
        response, raw = await post_json(wrong.client, wrong.v1("chat/completions"), body)
        assert response.code == 502
        assert "api_key" in orjson.loads(raw)["error"]["message"]
        bodies.append(raw)
        await proxy.settled()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert orjson.loads(document)["backends"][0]["type"] == "huggingface"
    assert fake.stats.requests[0].headers["authorization"] == f"Bearer {token}"
    assert any("POST /v1/chat/completions" in text for text in seen)  # the logs were watched
    for text in [*seen, *(b.decode() for b in bodies)]:
        assert token not in text
    assert token not in repr(proxy.app.config)


def test_the_huggingface_token_comes_from_the_environment() -> None:
    config = load_config(
        "backends: [{name: hf, type: huggingface}]", {"HF_TOKEN": "hf_from_the_environment"}
    )
    (backend,) = config.backends
    assert backend.url == "https://router.huggingface.co/v1"
    assert backend.api_key == "hf_from_the_environment"
    assert "hf_from_the_environment" not in repr(config)
    given = load_config(
        "backends: [{name: hf, type: huggingface, api_key: hf_given}]", {"HF_TOKEN": "hf_env"}
    )
    assert given.backends[0].api_key == "hf_given"
    with pytest.raises(ConfigError, match=r"backends\[0\]\.api_key: .*HF_TOKEN"):
        load_config("backends: [{name: hf, type: huggingface}]", {})


@pytest.mark.parametrize(
    ("kind", "given", "url"),
    [
        ("lmstudio", "10.0.0.5", "http://10.0.0.5:1234"),
        ("lmstudio", "http://10.0.0.5:1234/v1/", "http://10.0.0.5:1234/v1"),
        ("llamacpp", "localhost", "http://localhost:8080"),
        ("llamacpp", "gpu:9000", "http://gpu:9000"),
        ("vllm", "gpu-box", "http://gpu-box:8000"),
        ("tgi", "tgi.lan", "http://tgi.lan:3000"),
        (
            "tei",
            "https://xyz.endpoints.huggingface.cloud",
            "https://xyz.endpoints.huggingface.cloud",
        ),
        ("vllm", "[::1]:8001", "http://[::1]:8001"),
    ],
)
def test_each_kind_reads_its_url(kind: str, given: str, url: str) -> None:
    config = load_config(f"backends: [{{name: b, type: {kind}, url: '{given}'}}]", {})
    assert config.backends[0].url == url


@pytest.mark.parametrize("given", ["ftp://h", "http://u:p@h:1234", "http://h:99999"])
def test_a_bad_kind_url_names_the_key(given: str) -> None:
    with pytest.raises(ConfigError, match=r"backends\[0\]\.url"):
        load_config(f"backends: [{{name: b, type: vllm, url: '{given}'}}]", {})


# --------------------------------------------------------------------------
# What each kind says it can do


CAPABILITIES = {
    "ollama": {"ILoadedModels", "IModelLoading"},
    "openai": set(),
    "lmstudio": {"ILoadedModels", "IModelLoading", "ISamplingFields"},
    "llamacpp": {"IBusyness", "ISamplingFields"},
    "vllm": {"IBusyness", "ISamplingFields"},
    "tgi": {"IBusyness"},
    "tei": set(),
    "huggingface": {"IModelSuffixes"},
}


ALL_CAPABILITIES = (ILoadedModels, IBusyness, IModelLoading, IModelSuffixes, ISamplingFields)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_declares_what_it_can_do(kind: str) -> None:
    config = BackendConfig(name="b", type=kind, url="http://127.0.0.1:9", api_key="k")
    backend = build_backend(config, Agent(reactor), reactor)
    assert verifyObject(IBackend, backend)
    assert backend.kind == kind
    declared = {i.__name__ for i in ALL_CAPABILITIES if i.providedBy(backend)}
    assert declared == CAPABILITIES[kind]
    for capability in ALL_CAPABILITIES:
        if capability.providedBy(backend):
            assert verifyObject(capability, backend)


@pytest_twisted.ensureDeferred
async def test_health_shows_each_kind_and_its_own_probe(behind: Any) -> None:
    fake = FakeLlamaCpp(reactor, loading=True, slots=3)
    proxy = behind(fake, "llamacpp")
    response = await proxy.client.get(proxy.v1("health"))
    (backend,) = orjson.loads(await response.content())["backends"]
    assert (backend["type"], backend["reachable"]) == ("llamacpp", False)
    assert "Loading model" in backend["error"]
    fake.finish_loading()
    response = await proxy.client.get(proxy.v1("health"))
    (backend,) = orjson.loads(await response.content())["backends"]
    assert backend["reachable"] is True
    assert backend["version"] == "b6500-fakefake"
    assert backend["details"]["slots"] == 3
    assert backend["models_loaded"] == [fake.model.id]


# --------------------------------------------------------------------------
# Ollama and generic servers, described and loaded


@pytest_twisted.ensureDeferred
async def test_ollama_describes_loads_and_unloads_its_models(proxy_factory: Any) -> None:
    admin = AuthConfig(keys=(APIKey(name="root", sha256=hash_key(ADMIN), policy=_admin_policy()),))
    proxy: Proxy = proxy_factory(auth=admin)
    (ollama,) = proxy.app.router.backends
    headers = {"Authorization": f"Bearer {ADMIN}"}
    url = f"{proxy.url}/admin/models/load"
    response, raw = await post_json(proxy.client, url, {"model": "llama3.2"}, headers)
    assert response.code == 200, raw
    assert await ollama.loaded_models() == ["llama3.2:latest"]
    described = {d.id: d for d in await ollama.describe_models()}
    llama = described["llama3.2:latest"]
    assert llama.loaded is True and llama.family and llama.size and llama.parameters
    assert described["all-minilm:latest"].loaded is False
    url = f"{proxy.url}/admin/models/unload"
    response, raw = await post_json(proxy.client, url, {"model": "llama3.2"}, headers)
    assert response.code == 200, raw
    assert await ollama.loaded_models() == []


@pytest_twisted.ensureDeferred
async def test_a_generic_server_is_described_by_its_listing(serve: Any) -> None:
    backend = serve(FakeOpenAI(reactor), "openai", "/v1")
    described = await backend.describe_models()
    assert [d.id for d in described][:2] == ["gpt-fake", "org/fake-7b-instruct"]
    assert all(d.loaded is None and d.size is None for d in described)
    assert described[0].to_json() == {
        "id": "gpt-fake",
        "kind": None,
        "family": None,
        "size": None,
        "parameters": None,
        "quantization": None,
        "context_length": None,
        "loaded": None,
    }


@pytest.mark.parametrize(
    ("kind", "fake", "model", "expected"),
    [
        ("llamacpp", FakeLlamaCpp, "qwen2.5-7b-instruct-q4_k_m.gguf", {"top_k", "repeat_penalty"}),
        ("vllm", FakeVLLM, "Qwen/Qwen2.5-7B-Instruct", {"top_k", "repetition_penalty"}),
        ("lmstudio", FakeLMStudio, "qwen2.5-7b-instruct", {"top_k", "repeat_penalty", "ttl"}),
        ("tgi", FakeTGI, "HuggingFaceH4/zephyr-7b-beta", set()),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_models_options_reach_the_sampling_fields_its_server_takes(
    behind: Any, kind: str, fake: Any, model: str, expected: set[str]
) -> None:
    options = (
        ("temperature", 0.2),
        ("top_k", 20),
        ("repeat_penalty", 1.1),
        ("repetition_penalty", 1.05),
        ("ttl", 300),
        ("num_ctx", 8192),
    )
    served = fake(reactor)
    routing = RoutingConfig(models=(ModelRule("house", target=model, options=options),))
    proxy = behind(served, kind, routing=routing)
    body = {"model": "house", "messages": HELLO, "top_k": 5}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 200, raw
    upstream = sent(served, "/v1/chat/completions")
    assert upstream["temperature"] == 0.2
    assert upstream["top_k"] == 5  # the client's own value wins
    extra = {"top_k", "repeat_penalty", "repetition_penalty", "ttl", "num_ctx", "options"}
    assert {name for name in upstream if name in extra} == expected | ({"top_k"})
