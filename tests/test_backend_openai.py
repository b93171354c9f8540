"""
The OpenAI-compatible adapter against the fake OpenAI server, on real
loopback sockets: pass-through with the model renamed, the backend's key
sent (never the client's), usage asked for upstream and given to
``on_usage`` whatever the client asked, errors mapped to typed errors,
timeouts, cancellation that closes the upstream connection, models and
probes; and a few of these through the proxy itself.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from oproxy.backends.base import Call
from oproxy.backends.openai import (
    OpenAIBackend,
    error_details,
    split_base_url,
    upstream_error,
)
from oproxy.config import APIKey, AuthConfig, BackendConfig, RoutingConfig, Timeouts
from oproxy.errors import (
    InvalidRequest,
    ModelNotFound,
    OProxyError,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from oproxy.routing.router import Router, RoutingState
from oproxy.security.keys import hash_key
from oproxy.testing.openai import BROKEN_MESSAGE, DEFAULT_OPENAI_MODELS, FakeOpenAI
from oproxy.upstream import sse_data
from tests.httputil import header, post_json, raw_post, sse_events
from tests.openai_schema import assert_valid, assert_valid_sse

if TYPE_CHECKING:
    from tests.conftest import Proxy

UPSTREAM_KEY = "sk-upstream-0123456789"
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
USAGE = {"prompt_tokens": 5, "completion_tokens": 14, "total_tokens": 19}
ANSWER = "You said: Hello there, how are you. This is a fake answer from gpt-fake."


@dataclass
class FakeUpstream:
    """A fake OpenAI server on loopback, and a way to build adapters for it."""

    fake: FakeOpenAI
    url: str
    pool: HTTPConnectionPool
    site: CountingSite

    def backend(
        self,
        path: str = "/v1",
        *,
        api_key: str | None = UPSTREAM_KEY,
        timeouts: Timeouts | None = None,
        url: str | None = None,
    ) -> OpenAIBackend:
        config = BackendConfig(
            name="remote",
            type="openai",
            url=(url or self.url) + path,
            timeouts=timeouts or Timeouts(),
        )
        agent = Agent(reactor, pool=self.pool, connectTimeout=config.timeouts.connect)
        return OpenAIBackend(config, agent, reactor, api_key=api_key)


class CountingSite(Site):
    """A site that counts the connections made to it."""

    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)


def listen(site: Site) -> tuple[str, Any]:
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}", port


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeOpenAI(reactor, api_key=UPSTREAM_KEY)
    site = CountingSite(fake.resource())
    url, port = listen(site)
    pool = HTTPConnectionPool(reactor, persistent=True)
    yield FakeUpstream(fake, url, pool, site)
    pytest_twisted.blockon(pool.closeCachedConnections())
    pytest_twisted.blockon(port.stopListening())


@dataclass
class Recorded:
    """A routed call whose reported usage is kept."""

    usages: list[dict[str, int]] = field(default_factory=list)

    def call(self, upstream_model: str = "gpt-fake", client_model: str = "my-alias") -> Call:
        return Call(
            client_model=client_model,
            upstream_model=upstream_model,
            created=1,
            on_usage=lambda usage: self.usages.append(dict(usage)),
        )


async def collect(chunks: AsyncGenerator[dict[str, Any], None]) -> list[dict[str, Any]]:
    async with aclosing(chunks):
        return [chunk async for chunk in chunks]


async def consume(chunks: AsyncGenerator[dict[str, Any], None], into: list[Any]) -> None:
    """Read a stream into ``into``, so that what came before a failure is kept."""
    async with aclosing(chunks):
        async for chunk in chunks:
            into.append(chunk)


async def chat(backend: OpenAIBackend, call: Call, body: dict[str, Any]) -> Any:
    """A chat completion, streamed (and read whole) if the body says so."""
    if body.get("stream"):
        return await collect(await backend.chat_completion_stream(call, body))
    return await backend.chat_completion(call, body)


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition never became true")


def sent(upstream: FakeUpstream) -> Any:
    last = upstream.fake.stats.last_request
    assert last is not None
    return last


# --------------------------------------------------------------------------
# Base URLs


@pytest.mark.parametrize(
    ("url", "origin", "api", "health"),
    [
        ("http://h:8000", "http://h:8000", "/v1", "/health"),
        ("http://h:8000/", "http://h:8000", "/v1", "/health"),
        ("http://h:1234/v1", "http://h:1234", "/v1", "/health"),
        ("http://h:1234/v1/", "http://h:1234", "/v1", "/health"),
        ("https://api.groq.com/openai/v1", "https://api.groq.com", "/openai/v1", "/openai/health"),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai/",
            "https://generativelanguage.googleapis.com",
            "/v1beta/openai",
            "/v1beta/openai/health",
        ),
    ],
)
def test_base_url_forms(url: str, origin: str, api: str, health: str) -> None:
    base = split_base_url(url)
    assert (base.origin, base.api, base.health) == (origin, api, health)


@pytest.mark.parametrize(
    "url", ["ftp://h/v1", "http:///v1", "http://u:p@h/v1", "http://h/v1?api-version=1"]
)
def test_unusable_base_urls(url: str) -> None:
    with pytest.raises(ValueError, match="backend url"):
        split_base_url(url)


@pytest.mark.parametrize("path", ["", "/", "/v1", "/v1/"])
@pytest_twisted.ensureDeferred
async def test_server_or_api_root_both_work(upstream: FakeUpstream, path: str) -> None:
    backend = upstream.backend(path)
    answer = await backend.chat_completion(Recorded().call(), {"model": "x", "messages": HELLO})
    assert answer["choices"][0]["message"]["content"] == ANSWER
    assert sent(upstream).path == "/v1/chat/completions"


# --------------------------------------------------------------------------
# Chat


@pytest_twisted.ensureDeferred
async def test_chat_passes_through_renamed(upstream: FakeUpstream) -> None:
    recorded = Recorded()
    body = {"model": "my-alias", "messages": HELLO, "temperature": 0.2, "user": "u1"}
    answer = await upstream.backend().chat_completion(recorded.call(), body)
    assert_valid("CreateChatCompletionResponse", answer)
    assert answer["model"] == "my-alias"
    assert answer["choices"][0]["message"]["content"] == ANSWER
    assert answer["usage"] == USAGE
    assert recorded.usages == [USAGE]
    request = sent(upstream)
    assert request.body == {**body, "model": "gpt-fake"}
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest_twisted.ensureDeferred
async def test_chat_stream_asks_for_usage_and_hides_it(upstream: FakeUpstream) -> None:
    recorded = Recorded()
    body = {"model": "my-alias", "messages": HELLO, "stream": True}
    chunks = await collect(await upstream.backend().chat_completion_stream(recorded.call(), body))
    assert sent(upstream).body["stream_options"] == {"include_usage": True}
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
        assert chunk["model"] == "my-alias"
        assert chunk["choices"], "the usage-only chunk reached a client that did not ask"
        assert "usage" not in chunk
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert recorded.usages == [USAGE]


@pytest_twisted.ensureDeferred
async def test_chat_stream_keeps_usage_when_the_client_asks(upstream: FakeUpstream) -> None:
    recorded = Recorded()
    body = {
        "model": "my-alias",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = await collect(await upstream.backend().chat_completion_stream(recorded.call(), body))
    *content, last = chunks
    assert all(chunk["usage"] is None for chunk in content)
    assert last["choices"] == []
    assert last["usage"] == USAGE
    assert last["model"] == "my-alias"
    assert recorded.usages == [USAGE]


@pytest_twisted.ensureDeferred
async def test_client_stream_options_are_kept_but_usage_forced(upstream: FakeUpstream) -> None:
    body = {
        "model": "my-alias",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": False, "include_obfuscation": False},
    }
    chunks = await collect(await upstream.backend().chat_completion_stream(Recorded().call(), body))
    assert sent(upstream).body["stream_options"] == {
        "include_usage": True,
        "include_obfuscation": False,
    }
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)


@pytest_twisted.ensureDeferred
async def test_malformed_stream_options_are_refused_before_sending(upstream: FakeUpstream) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True, "stream_options": "yes"}
    with pytest.raises(InvalidRequest) as caught:
        await upstream.backend().chat_completion_stream(Recorded().call(), body)
    assert caught.value.param == "stream_options"
    assert upstream.fake.stats.requests == []


@pytest_twisted.ensureDeferred
async def test_stream_connection_is_reused_after_done(upstream: FakeUpstream) -> None:
    upstream.fake.token_delay = 0.005  # [DONE] arrives apart from the headers
    backend = upstream.backend()
    body = {"model": "m", "messages": HELLO, "stream": True}
    for _ in range(3):
        await collect(await backend.chat_completion_stream(Recorded().call(), body))
        await deferLater(reactor, 0.05, lambda: None)
    assert upstream.site.connections == 1


@pytest_twisted.ensureDeferred
async def test_upstream_time_is_counted(upstream: FakeUpstream) -> None:
    call = Recorded().call()
    await upstream.backend().chat_completion(call, {"model": "m", "messages": HELLO})
    assert call.upstream_time.seconds > 0


# --------------------------------------------------------------------------
# Completions and embeddings


@pytest_twisted.ensureDeferred
async def test_completion(upstream: FakeUpstream) -> None:
    recorded = Recorded()
    body = {"model": "my-alias", "prompt": "Hi", "max_tokens": 3}
    answer = await upstream.backend().completion(recorded.call(), body)
    assert_valid("CreateCompletionResponse", answer)
    assert answer["model"] == "my-alias"
    assert answer["choices"][0]["text"] == "You said: Hi."
    assert recorded.usages == [{"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}]
    assert sent(upstream).path == "/v1/completions"


@pytest.mark.parametrize("client_asks", [False, True])
@pytest_twisted.ensureDeferred
async def test_completion_stream(upstream: FakeUpstream, client_asks: bool) -> None:
    recorded = Recorded()
    body: dict[str, Any] = {"model": "my-alias", "prompt": "Hi", "stream": True}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    chunks = await collect(await upstream.backend().completion_stream(recorded.call(), body))
    for chunk in chunks:
        assert_valid("CreateCompletionStreamResponse", chunk)
        assert chunk["model"] == "my-alias"
    usage = {"prompt_tokens": 1, "completion_tokens": 10, "total_tokens": 11}
    assert [c["usage"] for c in chunks if not c["choices"]] == ([usage] if client_asks else [])
    assert recorded.usages == [usage]


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest_twisted.ensureDeferred
async def test_embeddings(upstream: FakeUpstream, encoding: str) -> None:
    recorded = Recorded()
    body = {"model": "my-alias", "input": ["a b", "c"], "encoding_format": encoding}
    answer = await upstream.backend().embeddings(recorded.call("embed-fake"), body)
    schema = "CreateEmbeddingResponse" if encoding == "float" else "CreateEmbeddingResponseBase64"
    assert_valid(schema, answer)
    assert answer["model"] == "my-alias"
    assert sent(upstream).body == {**body, "model": "embed-fake"}
    assert recorded.usages == [{"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}]


class FloatsOnly(Resource):
    """A server that ignores ``encoding_format`` (as some do)."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return orjson.dumps(
            {
                "object": "list",
                "model": "e",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.0]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )


@pytest_twisted.ensureDeferred
async def test_floats_are_encoded_when_base64_was_asked(upstream: FakeUpstream) -> None:
    url, port = listen(Site(FloatsOnly()))
    try:
        backend = upstream.backend(url=url)
        body = {"model": "e", "input": "x", "encoding_format": "base64"}
        answer = await backend.embeddings(Recorded().call("e"), body)
    finally:
        await port.stopListening()
    assert_valid("CreateEmbeddingResponseBase64", answer)
    packed = base64.b64decode(answer["data"][0]["embedding"])
    assert struct.unpack("<2f", packed) == (0.5, -1.0)


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "expected", "client_status"),
    [
        (400, InvalidRequest, 400),
        (401, UpstreamError, 502),
        (403, UpstreamError, 502),
        (404, UpstreamError, 502),
        (408, UpstreamTimeout, 504),
        (422, InvalidRequest, 400),
        (429, UpstreamBusy, 503),
        (500, UpstreamError, 502),
        (502, UpstreamError, 502),
        (503, UpstreamBusy, 503),
        (504, UpstreamTimeout, 504),
    ],
)
@pytest_twisted.ensureDeferred
async def test_upstream_statuses_map_to_typed_errors(
    upstream: FakeUpstream, stream: bool, status: int, expected: type, client_status: int
) -> None:
    upstream.fake.fail_next(status, "upstream says no", retry_after=3)
    backend = upstream.backend()
    body = {"model": "my-alias", "messages": HELLO, "stream": stream}
    with pytest.raises(OProxyError) as caught:
        await chat(backend, Recorded().call(), body)
    error = caught.value
    assert type(error) is expected
    assert error.status == client_status
    if status in (401, 403):
        assert "api_key" in error.message
        assert "upstream says no" not in error.message  # it may quote the key
    else:
        assert "upstream says no" in error.message
    if status in (429, 503):
        assert error.headers == {"Retry-After": "3"}
    assert_valid("ErrorResponse", error.to_body())


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_unknown_upstream_model_is_model_not_found(
    upstream: FakeUpstream, stream: bool
) -> None:
    backend = upstream.backend()
    call = Recorded().call(upstream_model="no-such-model", client_model="my-alias")
    body = {"model": "my-alias", "messages": HELLO, "stream": stream}
    with pytest.raises(ModelNotFound) as caught:
        await chat(backend, call, body)
    assert caught.value.model == "my-alias"
    assert "no-such-model" not in caught.value.message


@pytest_twisted.ensureDeferred
async def test_bad_request_keeps_param_and_code(upstream: FakeUpstream) -> None:
    body = {"model": "my-alias", "messages": []}
    with pytest.raises(InvalidRequest) as caught:
        await upstream.backend().chat_completion(Recorded().call(), body)
    assert (caught.value.param, caught.value.code) == ("messages", "empty_array")


@pytest_twisted.ensureDeferred
async def test_wrong_or_missing_key_is_a_backend_problem(upstream: FakeUpstream) -> None:
    body = {"model": "my-alias", "messages": HELLO}
    for key in ("sk-wrong-0000000000", None):
        with pytest.raises(UpstreamError) as caught:
            await upstream.backend(api_key=key).chat_completion(Recorded().call(), body)
        assert caught.value.status == 502
        assert "remote" in caught.value.message
        assert "0000" not in caught.value.message
    assert "authorization" not in sent(upstream).headers


def test_error_shapes_of_other_servers() -> None:
    vllm = {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}
    assert error_details(vllm).message == "bad"
    assert error_details(vllm).code is None  # an int is not an OpenAI code
    assert error_details({"error": "Input validation error", "error_type": "validation"}).message
    assert error_details(None).message is None
    quota = {"error": {"message": "You exceeded your quota", "type": "insufficient_quota"}}
    error = upstream_error(429, quota, Headers(), "remote", model="m")
    assert type(error) is UpstreamError
    assert "quota" in error.message
    busy = upstream_error(429, {}, Headers({"retry-after": ["soon"]}), "remote")
    assert type(busy) is UpstreamBusy
    assert busy.headers == {}  # only numbers are passed on


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_unavailable(upstream: FakeUpstream) -> None:
    url, port = listen(Site(Resource()))
    await port.stopListening()
    with pytest.raises(UpstreamUnavailable) as caught:
        await upstream.backend(url=url).chat_completion(Recorded().call(), {"messages": HELLO})
    assert "remote" in caught.value.message


# --------------------------------------------------------------------------
# Streams that go wrong


@pytest_twisted.ensureDeferred
async def test_in_band_error_is_raised(upstream: FakeUpstream) -> None:
    body = {"model": "my-alias", "messages": HELLO, "stream": True}
    chunks = await upstream.backend().chat_completion_stream(Recorded().call("broken"), body)
    received = []
    with pytest.raises(UpstreamError) as caught:
        await consume(chunks, received)
    assert caught.value.message == BROKEN_MESSAGE
    assert len(received) == 3
    with pytest.raises(UpstreamError, match="HTTP 500"):
        await upstream.backend().chat_completion(
            Recorded().call("broken"), {**body, "stream": False}
        )


class CutShort(Resource):
    """A server whose stream ends without ``data: [DONE]``."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/event-stream")
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
        }
        return b": keep-alive\r\n\r\ndata:" + orjson.dumps(chunk) + b"\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_stream_cut_short_is_an_error(upstream: FakeUpstream) -> None:
    url, port = listen(Site(CutShort()))
    try:
        body = {"model": "m", "messages": HELLO, "stream": True}
        chunks = await upstream.backend(url=url).chat_completion_stream(Recorded().call(), body)
        received = []
        with pytest.raises(UpstreamError, match="before it was complete"):
            await consume(chunks, received)
    finally:
        await port.stopListening()
    assert [c["choices"][0]["delta"]["content"] for c in received] == ["Hi"]


def test_sse_data_lines() -> None:
    assert sse_data(b"data: {}") == b"{}"
    assert sse_data(b"data:{}\r") == b"{}"
    assert sse_data(b"data:  x") == b" x"
    assert sse_data(b": comment") is None
    assert sse_data(b"event: error") is None


# --------------------------------------------------------------------------
# Timeouts and cancellation


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_first_byte_timeout_closes_upstream(upstream: FakeUpstream, stream: bool) -> None:
    backend = upstream.backend(timeouts=Timeouts(connect=5, first_byte=0.3, between_chunks=5))
    body = {"model": "my-alias", "messages": HELLO, "stream": stream}
    with pytest.raises(UpstreamTimeout):
        await chat(backend, Recorded().call("stall"), body)
    await wait_until(lambda: upstream.fake.stats.aborted == 1)


@pytest_twisted.ensureDeferred
async def test_stall_between_chunks_times_out_and_closes(upstream: FakeUpstream) -> None:
    backend = upstream.backend(timeouts=Timeouts(connect=5, first_byte=5, between_chunks=0.3))
    body = {"model": "my-alias", "messages": HELLO, "stream": True}
    chunks = await backend.chat_completion_stream(Recorded().call("stall-midway"), body)
    received = []
    with pytest.raises(UpstreamTimeout, match=r"sent nothing for 0\.3 seconds"):
        await consume(chunks, received)
    assert len(received) == 2
    await wait_until(lambda: upstream.fake.stats.aborted_streams == 1)


@pytest_twisted.ensureDeferred
async def test_abandoned_stream_aborts_upstream(upstream: FakeUpstream) -> None:
    recorded = Recorded()
    body = {"model": "my-alias", "messages": HELLO, "stream": True}
    chunks = await upstream.backend().chat_completion_stream(recorded.call("slow"), body)
    assert (await anext(chunks))["choices"][0]["delta"]["role"] == "assistant"
    await anext(chunks)
    await chunks.aclose()
    await wait_until(lambda: upstream.fake.stats.aborted_streams == 1)
    assert upstream.fake.stats.completed == 0
    assert upstream.fake.pending_timers() == 0
    assert recorded.usages == []  # none was reported before the client left


@pytest_twisted.ensureDeferred
async def test_cancelled_request_aborts_upstream(upstream: FakeUpstream) -> None:
    body = {"model": "my-alias", "messages": HELLO}
    running = defer.Deferred.fromCoroutine(
        upstream.backend().chat_completion(Recorded().call("slow"), body)
    )
    await wait_until(lambda: upstream.fake.stats.in_flight == 1)
    running.cancel()
    running.addErrback(lambda _: None)  # what the caller sees is the app's business
    await wait_until(lambda: upstream.fake.stats.aborted == 1)
    assert upstream.fake.stats.aborted_streams == 0


# --------------------------------------------------------------------------
# Models and probes


@pytest_twisted.ensureDeferred
async def test_list_models(upstream: FakeUpstream) -> None:
    models = await upstream.backend().list_models()
    assert [m["id"] for m in models] == [m.id for m in DEFAULT_OPENAI_MODELS]
    for model in models:
        assert_valid("Model", model)
        assert model["owned_by"] == "remote"


@pytest_twisted.ensureDeferred
async def test_retrieve_model(upstream: FakeUpstream) -> None:
    backend = upstream.backend()
    model = await backend.retrieve_model("org/fake-7b-instruct")
    assert_valid("Model", model)
    assert model["id"] == "org/fake-7b-instruct"
    assert sent(upstream).path == "/v1/models/org%2Ffake-7b-instruct"
    with pytest.raises(ModelNotFound):
        await backend.retrieve_model("nope")


class ListingOnly(Resource):
    """A server with ``/v1/models`` but no ``/v1/models/{id}`` (llama.cpp)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        if request.path != b"/v1/models":
            request.setResponseCode(404)
            return b"Not Found"
        request.setHeader(b"content-type", b"application/json")
        return orjson.dumps({"object": "list", "data": [{"id": "only.gguf", "object": "model"}]})


@pytest_twisted.ensureDeferred
async def test_retrieve_model_falls_back_to_the_listing(upstream: FakeUpstream) -> None:
    url, port = listen(Site(ListingOnly()))
    try:
        backend = upstream.backend("", url=url)
        model = await backend.retrieve_model("only.gguf")
        with pytest.raises(ModelNotFound):
            await backend.retrieve_model("other.gguf")
        probed = await backend.probe()
    finally:
        await port.stopListening()
    assert model == {"id": "only.gguf", "object": "model", "created": 0, "owned_by": "remote"}
    assert probed["models_available"] == 1


@pytest_twisted.ensureDeferred
async def test_probe_uses_health_when_there_is_one(upstream: FakeUpstream) -> None:
    found = await upstream.backend().probe()
    assert found == {"version": None, "models_available": None, "models_loaded": []}
    assert [r.path for r in upstream.fake.stats.requests] == ["/health"]


@pytest_twisted.ensureDeferred
async def test_probe_falls_back_to_models_and_remembers(upstream: FakeUpstream) -> None:
    upstream.fake.health_status = None
    backend = upstream.backend()
    for _ in range(2):
        found = await backend.probe()
        assert found["models_available"] == len(DEFAULT_OPENAI_MODELS)
    paths = [r.path for r in upstream.fake.stats.requests]
    assert paths == ["/health", "/v1/models", "/v1/models"]
    assert all(r.method == "GET" for r in upstream.fake.stats.requests)


@pytest_twisted.ensureDeferred
async def test_probe_reports_a_loading_server_and_a_bad_key(upstream: FakeUpstream) -> None:
    upstream.fake.health_status = 503
    with pytest.raises(UpstreamBusy, match="Loading model"):
        await upstream.backend().probe()
    upstream.fake.health_status = None
    with pytest.raises(UpstreamError, match="api_key"):
        await upstream.backend(api_key="sk-wrong").probe()


# --------------------------------------------------------------------------
# Through the proxy


CLIENT_KEY = "sk-client-abcdefghijklmnop"


def through_proxy(proxy_factory: Any, upstream: FakeUpstream, **changes: Any) -> Proxy:
    """The proxy under test, with every model routed to the adapter."""
    proxy: Proxy = proxy_factory(**changes)
    routing = RoutingConfig()
    router = Router([upstream.backend()], routing, RoutingState.new(reactor, routing))
    proxy.app.swap(proxy.app.config, router, proxy.app.cache)
    return proxy


@pytest_twisted.ensureDeferred
async def test_the_client_key_never_goes_upstream(
    proxy_factory: Any, upstream: FakeUpstream
) -> None:
    auth = AuthConfig(keys=(APIKey(name="alice", sha256=hash_key(CLIENT_KEY)),))
    proxy = through_proxy(proxy_factory, upstream, auth=auth)
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "gpt-fake", "messages": HELLO},
        {"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert response.code == 200, raw
    assert_valid("CreateChatCompletionResponse", orjson.loads(raw))
    headers = sent(upstream).headers
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not any(CLIENT_KEY in value for value in headers.values())


@pytest_twisted.ensureDeferred
async def test_stream_through_the_proxy(proxy_factory: Any, upstream: FakeUpstream) -> None:
    proxy = through_proxy(proxy_factory, upstream)
    body = {"model": "gpt-fake", "messages": HELLO, "stream": True}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 200, raw
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    assert all(event == "[DONE]" or event["choices"] for event in events)
    assert sent(upstream).body["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_upstream_errors_reach_the_client_as_openai_errors(
    proxy_factory: Any, upstream: FakeUpstream
) -> None:
    proxy = through_proxy(proxy_factory, upstream)
    upstream.fake.fail_next(429, retry_after=2)
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "busy?"}]}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 503
    assert header(response, "retry-after") == "2"
    assert_valid("ErrorResponse", orjson.loads(raw))


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_client_leaving_aborts_the_upstream(
    proxy_factory: Any, upstream: FakeUpstream, stream: bool
) -> None:
    proxy = through_proxy(proxy_factory, upstream)
    body = {"model": "slow", "messages": HELLO, "stream": stream}
    client = await raw_post(proxy.url, "/v1/chat/completions", body)
    if stream:
        await wait_until(lambda: client.received.count(b"data: ") >= 2)
    else:
        await wait_until(lambda: upstream.fake.stats.in_flight == 1)
    client.transport.loseConnection()
    await wait_until(lambda: upstream.fake.stats.aborted == 1)
    assert upstream.fake.stats.aborted_streams == (1 if stream else 0)
    assert upstream.fake.stats.completed == 0
