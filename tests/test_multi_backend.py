"""
Routing across several backends, through the proxy: two fake Ollamas and a
fake OpenAI-compatible server on loopback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.web.resource import Resource
from twisted.web.server import Site

from oproxy.config import BackendConfig, ModelRule, RoutingConfig
from oproxy.testing import FakeOllama, FakeOpenAI
from tests.conftest import Proxy, listen
from tests.httputil import header, post_json, raw_post, sse_events
from tests.openai_schema import assert_valid

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def fakes(fake_ollama: tuple[FakeOllama, str]) -> Iterator[dict[str, Any]]:
    second = FakeOllama(reactor)
    second_running = listen(Site(second.resource()))
    openai = FakeOpenAI(reactor, api_key="sk-upstream")
    openai_running = listen(Site(openai.resource()))
    first, first_url = fake_ollama
    yield {
        "a": (first, first_url),
        "b": (second, second_running.url),
        "c": (openai, openai_running.url + "/v1"),
    }
    pytest_twisted.blockon(second_running.port.stopListening())
    pytest_twisted.blockon(openai_running.port.stopListening())


@pytest.fixture
def pool(proxy_factory: Any, fakes: dict[str, Any]) -> Any:
    def start(**routing: Any) -> Proxy:
        backends = (
            BackendConfig(name="a", type="ollama", url=fakes["a"][1]),
            BackendConfig(name="b", type="ollama", url=fakes["b"][1]),
            BackendConfig(name="c", type="openai", url=fakes["c"][1], api_key="sk-upstream"),
        )
        started: Proxy = proxy_factory(backends=backends, routing=RoutingConfig(**routing))
        return started

    return start


async def chat(proxy: Proxy, model: str = "llama3.2", **extra: Any) -> tuple[Any, Any]:
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": model, "messages": HELLO, **extra}
    )
    return response, raw


@pytest_twisted.ensureDeferred
async def test_round_robin_spreads_and_says_who_answered(pool: Any, fakes: Any) -> None:
    proxy = pool()
    served = Counter()
    for _ in range(10):
        response, _ = await chat(proxy)
        assert response.code == 200
        served[header(response, "x-oproxy-backend")] += 1
    assert served == {"a": 5, "b": 5}
    assert fakes["a"][0].stats.started == 5 and fakes["b"][0].stats.started == 5


@pytest_twisted.ensureDeferred
async def test_least_busy_avoids_the_busy_backend(pool: Any) -> None:
    proxy = pool(strategy="least-busy")
    slow = defer.Deferred.fromCoroutine(chat(proxy, "slow", max_tokens=20))
    while not proxy.app.router.state.busy:
        await task.deferLater(reactor, 0.01)
    (busy_one,) = proxy.app.router.state.busy
    others = {header((await chat(proxy))[0], "x-oproxy-backend") for _ in range(4)}
    assert others == {"a", "b"} - {busy_one}
    assert (await slow)[0].code == 200


@pytest_twisted.ensureDeferred
async def test_prefer_warm_sticks_to_the_loaded_backend(pool: Any) -> None:
    proxy = pool(strategy="prefer-warm")
    first = header((await chat(proxy))[0], "x-oproxy-backend")
    assert [header((await chat(proxy))[0], "x-oproxy-backend") for _ in range(5)] == [first] * 5


@pytest_twisted.ensureDeferred
async def test_a_failing_backend_is_retried_elsewhere_then_skipped(pool: Any, fakes: Any) -> None:
    proxy = pool(breaker_failures=1, breaker_cooldown=60)
    fakes["a"][0].fail_next(500, "model runner crashed")
    fakes["b"][0].fail_next(500, "model runner crashed")
    response, raw = await chat(proxy)
    # Both failed before answering: the client sees the last failure.
    assert response.code == 502
    fakes["a"][0].fail_next(500, "model runner crashed")
    # Both circuits are open now: a fast 503 that says when to come back.
    response, raw = await chat(proxy)
    assert response.code == 503
    body = orjson.loads(raw)
    assert body["error"]["code"] == "backends_unavailable"
    assert header(response, "retry-after") == "60"
    # Nothing more was sent to either.
    assert len(fakes["a"][0].stats.requests) == 1 and len(fakes["b"][0].stats.requests) == 1


@pytest_twisted.ensureDeferred
async def test_one_failure_moves_to_the_next_backend(pool: Any, fakes: Any) -> None:
    proxy = pool()
    for _ in range(2):  # whichever comes first fails once
        fakes["a"][0].fail_next(503, "server busy, please try again.")
        response, raw = await chat(proxy, stream=True)
        assert response.code == 200
        assert header(response, "x-oproxy-backend") == "b"
        events = sse_events(raw)
        assert events[-1] == "[DONE]"


@pytest_twisted.ensureDeferred
async def test_aliases_options_and_fallbacks(pool: Any, fakes: Any) -> None:
    proxy = pool(
        models=(
            ModelRule(
                "gpt-4o-mini",
                target="gpt-fake",
                backends=("c",),
                fallbacks=("local-small",),
            ),
            ModelRule(
                "local-small",
                target="llama3.2:latest",
                backends=("b",),
                options=(("num_ctx", 4096), ("temperature", 0.1)),
            ),
        )
    )
    response, raw = await chat(proxy, "gpt-4o-mini")
    assert response.code == 200 and header(response, "x-oproxy-backend") == "c"
    answer = orjson.loads(raw)
    assert answer["model"] == "gpt-4o-mini"
    assert_valid("CreateChatCompletionResponse", answer)
    seen = fakes["c"][0].stats.last_request
    assert seen.body["model"] == "gpt-fake"
    assert seen.headers["authorization"] == "Bearer sk-upstream"  # never the client's

    fakes["c"][0].fail_next(503, times=3)
    response, raw = await chat(proxy, "gpt-4o-mini", temperature=0.7)
    assert response.code == 200 and header(response, "x-oproxy-backend") == "b"
    assert orjson.loads(raw)["model"] == "local-small"  # the model that answered
    _, sent = fakes["b"][0].stats.requests[-1]
    assert sent["model"] == "llama3.2:latest"
    assert sent["options"]["num_ctx"] == 4096
    assert sent["options"]["temperature"] == 0.7  # the client's value wins


@pytest_twisted.ensureDeferred
async def test_openai_backend_streams_with_usage_counted(pool: Any, fakes: Any) -> None:
    proxy = pool()
    response, raw = await chat(proxy, "gpt-fake", stream=True)
    assert response.code == 200 and header(response, "x-oproxy-backend") == "c"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e or e["usage"] is None for e in events[:-1])
    assert fakes["c"][0].stats.last_request.body["stream_options"] == {"include_usage": True}


@pytest_twisted.ensureDeferred
async def test_models_are_the_union_with_owners_and_aliases(pool: Any) -> None:
    proxy = pool(models=(ModelRule("gpt-4o-mini", target="llama3.2:latest"),))
    response = await proxy.client.get(proxy.v1("models"))
    listing = orjson.loads(await treq.content(response))
    owners = {m["id"]: m["owned_by"] for m in listing["data"]}
    assert owners["llama3.2:latest"] == "a"  # both Ollamas serve it; the first names it
    assert owners["gpt-fake"] == "c"
    assert owners["gpt-4o-mini"] == "a"
    assert_valid("ListModelsResponse", listing)
    response = await proxy.client.get(proxy.v1("models/gpt-4o-mini"))
    assert orjson.loads(await treq.content(response))["id"] == "gpt-4o-mini"


@pytest_twisted.ensureDeferred
async def test_an_abandoned_openai_stream_is_counted(pool: Any, fakes: Any) -> None:
    proxy = pool(models=(ModelRule("remote-slow", target="slow", backends=("c",)),))
    client = await raw_post(
        proxy.url,
        "/v1/chat/completions",
        {"model": "remote-slow", "messages": HELLO, "stream": True},
    )
    for _ in range(500):
        if client.received.count(b'"content"') >= 4:
            break
        await task.deferLater(reactor, 0.01)
    client.transport.loseConnection()
    for _ in range(500):
        if fakes["c"][0].stats.aborted_streams:
            break
        await task.deferLater(reactor, 0.01)
    assert fakes["c"][0].stats.aborted_streams == 1
    await task.deferLater(reactor, 0.05)
    scrape = (await treq.content(await proxy.client.get(f"{proxy.url}/metrics"))).decode()
    counted = [
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("oproxy_tokens_total{")
        and 'direction="completion"' in line
        and 'model="remote-slow"' in line
    ]
    assert counted and counted[0] >= 3  # the first chunk carries the role, not text


def chats_sent(fake: FakeOllama, model: str) -> int:
    """How many chat requests for ``model`` reached ``fake``."""
    return sum(
        1
        for path, body in fake.stats.requests
        if path == "/api/chat" and body.get("model") in (model, f"{model}:latest")
    )


@pytest_twisted.ensureDeferred
async def test_a_crashing_model_leaves_the_other_models_of_its_backend_alone(
    pool: Any, fakes: Any
) -> None:
    proxy = pool(breaker_failures=3, breaker_cooldown=60)
    a, b = fakes["a"][0], fakes["b"][0]
    a.fail_model("llama3.2")  # Ollama's 500 "llama runner process has terminated"
    answered = Counter()
    for _ in range(8):  # every other one tries a first, fails there, and moves on to b
        response, _ = await chat(proxy, "llama3.2")
        assert response.code == 200
        answered[header(response, "x-oproxy-backend")] += 1
    assert answered == {"b": 8}
    assert chats_sent(a, "llama3.2") == 3  # then its circuit opened: a gets no more
    for _ in range(6):
        response, _ = await chat(proxy, "llama3.2")
        assert header(response, "x-oproxy-backend") == "b"
    assert chats_sent(a, "llama3.2") == 3
    # The backend's other models are served there as before.
    served = Counter()
    for _ in range(6):
        response, _ = await chat(proxy, "qwen3")
        assert response.code == 200
        served[header(response, "x-oproxy-backend")] += 1
    assert served == {"a": 3, "b": 3}
    await proxy.settled()
    scrape = (await treq.content(await proxy.client.get(f"{proxy.url}/metrics"))).decode()
    assert 'oproxy_model_circuit_open{backend="a",model="llama3.2:latest"} 1.0' in scrape
    assert 'oproxy_backend_circuit_open{backend="a"}' not in scrape

    # When it fails everywhere: a fast 503 with Retry-After, other models untouched.
    b.fail_model("llama3.2")
    for _ in range(3):
        response, _ = await chat(proxy, "llama3.2")
        assert response.code == 502
    response, raw = await chat(proxy, "llama3.2")
    assert response.code == 503 and orjson.loads(raw)["error"]["code"] == "backends_unavailable"
    assert header(response, "retry-after") == "60"
    assert chats_sent(b, "llama3.2") == 8 + 6 + 3
    response, _ = await chat(proxy, "qwen3")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_client_errors_and_busy_answers_open_nothing(pool: Any, fakes: Any) -> None:
    proxy = pool(breaker_failures=1, breaker_cooldown=60, retries=0)
    a = fakes["a"][0]
    for status, message in [
        (400, "invalid options"),
        (404, 'model "llama3.2" not found, try pulling it first'),
        (429, "too many requests"),
        (503, "server busy, please try again.  maximum pending requests exceeded"),
    ]:
        for _ in range(2):  # a-first every other time, with round robin
            a.fail_next(status, message)
            await chat(proxy, "llama3.2")
            a.reset()
    breaker = proxy.app.router.state.breaker
    assert not breaker.is_open("a", "llama3.2:latest") and not breaker.is_open("a")
    assert chats_sent(fakes["b"][0], "llama3.2") >= 1


@pytest_twisted.ensureDeferred
async def test_an_unreachable_backend_is_out_for_every_model(
    proxy_factory: Any, fakes: Any
) -> None:
    dead = listen(Site(Resource()))
    await dead.port.stopListening()
    proxy = proxy_factory(
        backends=(
            BackendConfig(name="dead", type="ollama", url=dead.url),
            BackendConfig(name="b", type="ollama", url=fakes["b"][1]),
        ),
        routing=RoutingConfig(
            breaker_failures=2,
            breaker_cooldown=60,
            models=(
                ModelRule("llama3.2", backends=("dead", "b")),
                ModelRule("qwen3", backends=("dead", "b")),
            ),
        ),
    )
    for model in ("llama3.2", "qwen3", "llama3.2", "qwen3"):
        response, _ = await chat(proxy, model)
        assert response.code == 200 and header(response, "x-oproxy-backend") == "b"
    breaker = proxy.app.router.state.breaker
    assert breaker.is_open("dead") and breaker.is_open("dead", "all-minilm:latest")
