"""
The response cache through the proxy: what is cached, what is replayed, and
what the client is told (``X-Cache``, ``Age``).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor, task

from oproxy.config import APIKey, AuthConfig, CacheConfig
from oproxy.security.keys import hash_key
from tests.conftest import Proxy
from tests.httputil import header, post_json, sse_events
from tests.redisserver import RedisServer, redis_server  # noqa: F401 - a fixture

HELLO = [{"role": "user", "content": "Is this cached?"}]


def upstream_calls(proxy: Proxy, path: str) -> int:
    return sum(1 for seen, _ in proxy.fake.stats.requests if seen == path)


async def post(
    proxy: Proxy, route: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[Any, bytes]:
    return await post_json(proxy.client, proxy.v1(route), body, headers)


@pytest_twisted.ensureDeferred
async def test_embeddings_are_cached(proxy: Proxy) -> None:
    body = {"model": "all-minilm", "input": ["a", "b"]}
    first, first_raw = await post(proxy, "embeddings", body)
    assert header(first, "x-cache") == "MISS"
    await task.deferLater(reactor, 1.1, lambda: None)
    second, second_raw = await post(proxy, "embeddings", body)
    assert header(second, "x-cache") == "HIT"
    assert int(header(second, "age") or "0") >= 1
    assert orjson.loads(second_raw) == orjson.loads(first_raw)
    assert upstream_calls(proxy, "/api/embed") == 1


@pytest_twisted.ensureDeferred
async def test_deterministic_chat_is_cached_and_others_bypass(proxy: Proxy) -> None:
    deterministic = {"model": "llama3.2", "messages": HELLO, "temperature": 0}
    assert header((await post(proxy, "chat/completions", deterministic))[0], "x-cache") == "MISS"
    assert header((await post(proxy, "chat/completions", deterministic))[0], "x-cache") == "HIT"
    seeded = {"model": "llama3.2", "messages": HELLO, "seed": 7}
    await post(proxy, "chat/completions", seeded)
    assert header((await post(proxy, "chat/completions", seeded))[0], "x-cache") == "HIT"
    random = {"model": "llama3.2", "messages": HELLO}
    for _ in range(2):
        response, _ = await post(proxy, "chat/completions", random)
        assert header(response, "x-cache") == "BYPASS"
    assert upstream_calls(proxy, "/api/chat") == 4


@pytest_twisted.ensureDeferred
async def test_cached_stream_is_replayed_as_sse(proxy: Proxy) -> None:
    body = {"model": "llama3.2", "messages": HELLO, "temperature": 0, "stream": True}
    _, first_raw = await post(proxy, "chat/completions", body)
    second, second_raw = await post(proxy, "chat/completions", body)
    assert header(second, "x-cache") == "HIT"
    assert header(second, "content-type").startswith("text/event-stream")
    assert sse_events(second_raw) == sse_events(first_raw)
    assert sse_events(second_raw)[-1] == "[DONE]"
    assert upstream_calls(proxy, "/api/chat") == 1


@pytest_twisted.ensureDeferred
async def test_failed_stream_is_not_cached(proxy: Proxy) -> None:
    body = {"model": "broken", "messages": HELLO, "temperature": 0, "stream": True}
    for _ in range(2):
        response, _ = await post(proxy, "chat/completions", body)
        assert header(response, "x-cache") == "MISS"
    assert upstream_calls(proxy, "/api/chat") == 2


@pytest.mark.parametrize(
    ("cache_control", "second"),
    [("no-store", "BYPASS"), ("no-cache", "MISS"), ("max-age=0", "MISS"), ("max-age=60", "HIT")],
)
@pytest_twisted.ensureDeferred
async def test_request_cache_control(proxy: Proxy, cache_control: str, second: str) -> None:
    body = {"model": "all-minilm", "input": "cache control"}
    await post(proxy, "embeddings", body)
    response, _ = await post(proxy, "embeddings", body, {"Cache-Control": cache_control})
    assert header(response, "x-cache") == second


@pytest_twisted.ensureDeferred
async def test_no_cache_refreshes_the_stored_answer(proxy: Proxy) -> None:
    body = {"model": "all-minilm", "input": "refresh"}
    await post(proxy, "embeddings", body)
    await post(proxy, "embeddings", body, {"Cache-Control": "no-cache"})
    response, _ = await post(proxy, "embeddings", body)
    assert header(response, "x-cache") == "HIT"
    assert header(response, "age") == "0"
    assert upstream_calls(proxy, "/api/embed") == 2


@pytest_twisted.ensureDeferred
async def test_no_replay_across_keys(proxy_factory: Any) -> None:
    keys = (APIKey("alice", hash_key("sk-a")), APIKey("bob", hash_key("sk-b")))
    proxy = proxy_factory(auth=AuthConfig(keys=keys))
    body = {"model": "all-minilm", "input": "private"}
    alice = {"Authorization": "Bearer sk-a"}
    bob = {"Authorization": "Bearer sk-b"}
    await post(proxy, "embeddings", body, alice)
    assert header((await post(proxy, "embeddings", body, bob))[0], "x-cache") == "MISS"
    assert header((await post(proxy, "embeddings", body, alice))[0], "x-cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_disabled_cache_bypasses(proxy_factory: Any) -> None:
    proxy = proxy_factory(cache=CacheConfig(enabled=False))
    body = {"model": "all-minilm", "input": "x"}
    for _ in range(2):
        response, _ = await post(proxy, "embeddings", body)
        assert header(response, "x-cache") == "BYPASS"
    assert upstream_calls(proxy, "/api/embed") == 2


@pytest_twisted.ensureDeferred
async def test_redis_cache_is_shared_between_proxies(
    proxy_factory: Any,
    redis_server: RedisServer,  # noqa: F811 - the fixture
) -> None:
    cache = CacheConfig(backend="redis", redis_url=redis_server.url)
    first = proxy_factory(cache=cache)
    second = proxy_factory(cache=cache)
    body = {"model": "all-minilm", "input": "shared between hosts"}
    response, raw = await post(first, "embeddings", body)
    assert header(response, "x-cache") == "MISS"
    response, replayed = await post(second, "embeddings", body)
    assert header(response, "x-cache") == "HIT"
    assert orjson.loads(replayed) == orjson.loads(raw)
