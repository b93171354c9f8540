"""
``GET /metrics``: what a Prometheus scrape sees after traffic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

from oproxy.config import APIKey, AuthConfig, MetricsConfig, RequestLimits, StateConfig, load_config
from oproxy.errors import Unauthorized
from oproxy.health import ProbeService
from oproxy.metrics import METRICS, Metrics
from oproxy.security.keys import hash_key
from oproxy.security.policy import KeyPolicy
from oproxy.security.records import new_key
from oproxy.security.scraping import check_scraper, is_local
from oproxy.tap import build_site
from tests.conftest import Proxy
from tests.httputil import RawClient, header, post_json

HELLO = [{"role": "user", "content": "count me"}]


async def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await proxy.client.get(f"{proxy.url}/metrics")
    assert response.code == 200
    assert header(response, "content-type").startswith("text/plain")
    text = (await treq.content(response)).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_twisted.ensureDeferred
async def test_scrape_after_traffic(proxy: Proxy) -> None:
    chat = proxy.v1("chat/completions")
    await post_json(proxy.client, chat, {"model": "llama3.2", "messages": HELLO})
    await post_json(proxy.client, chat, {"model": "llama3.2", "messages": HELLO, "stream": True})
    await post_json(proxy.client, chat, {"model": "no-such-model", "messages": HELLO})
    embed = {"model": "all-minilm", "input": "x"}
    for _ in range(2):
        await post_json(proxy.client, proxy.v1("embeddings"), embed)
    samples = await scrape(proxy)

    route = "/v1/chat/completions"
    ok = {"route": route, "model": "llama3.2", "backend": "local", "status": "200"}
    assert value(samples, "oproxy_requests_total", **ok) == 2
    assert (
        value(
            samples,
            "oproxy_requests_total",
            route=route,
            model="-",
            backend="-",  # no backend serves it: routing answered
            status="404",
        )
        == 1
    )
    assert value(samples, "oproxy_request_duration_seconds_count", route=route) == 3
    assert (
        value(samples, "oproxy_time_to_first_token_seconds_count", route="chat", model="llama3.2")
        == 1
    )
    prompt = value(samples, "oproxy_tokens_total", direction="prompt", model="llama3.2", key="-")
    completion = value(
        samples, "oproxy_tokens_total", direction="completion", model="llama3.2", key="-"
    )
    assert prompt > 0 and completion > 0
    assert value(samples, "oproxy_cache_requests_total", result="hit") == 1
    assert value(samples, "oproxy_cache_requests_total", result="miss") == 1
    assert value(samples, "oproxy_cache_requests_total", result="bypass") == 2
    assert value(samples, "oproxy_requests_in_flight") == 0
    assert not any("req_" in str(labels) for _, labels in samples)


@pytest_twisted.ensureDeferred
async def test_streamed_tokens_are_counted_without_a_usage_chunk(proxy: Proxy) -> None:
    chat = proxy.v1("chat/completions")
    await post_json(proxy.client, chat, {"model": "qwen3", "messages": HELLO})
    before = await scrape(proxy)
    await post_json(proxy.client, chat, {"model": "qwen3", "messages": HELLO, "stream": True})
    after = await scrape(proxy)
    key = ("oproxy_tokens_total", (("direction", "completion"), ("key", "-"), ("model", "qwen3")))
    assert after[key] - before[key] > 0
    assert after[key] == 2 * before[key]


@pytest_twisted.ensureDeferred
async def test_upstream_errors_by_backend_and_kind(proxy: Proxy) -> None:
    chat = proxy.v1("chat/completions")
    await post_json(proxy.client, chat, {"model": "crash", "messages": HELLO})
    samples = await scrape(proxy)
    assert (
        value(samples, "oproxy_upstream_errors_total", backend="local", kind="upstream_error") == 1
    )


@pytest_twisted.ensureDeferred
async def test_health_probes_set_backend_gauges(proxy: Proxy) -> None:
    await proxy.client.get(f"{proxy.url}/readyz")
    samples = await scrape(proxy)
    assert value(samples, "oproxy_backend_up", backend="local") == 1
    assert value(samples, "oproxy_backend_probe_latency_seconds", backend="local") > 0


def dashboard_metric_names() -> set[str]:
    """Every oproxy metric the example Grafana dashboard queries."""
    path = Path(__file__).resolve().parent.parent / "etc" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    return {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"oproxy_[a-z_]+", target["expr"])
    }


@pytest_twisted.ensureDeferred
async def test_grafana_dashboard_uses_metrics_that_exist(proxy: Proxy) -> None:
    chat = proxy.v1("chat/completions")
    await post_json(proxy.client, chat, {"model": "llama3.2", "messages": HELLO, "stream": True})
    await post_json(proxy.client, chat, {"model": "crash", "messages": HELLO})
    await proxy.client.get(f"{proxy.url}/readyz")
    names = {name for name, _ in await scrape(proxy)}
    used = dashboard_metric_names()
    assert used
    assert used <= names, used - names


@pytest_twisted.ensureDeferred
async def test_overhead_excludes_time_spent_waiting_upstream(proxy: Proxy) -> None:
    proxy.fake.token_delay = 0.02  # an answer of ~15 tokens takes ~0.3 s upstream
    started = reactor.seconds()
    response, _ = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": "llama3.2", "messages": HELLO}
    )
    total_ms = (reactor.seconds() - started) * 1000
    overhead_ms = float(header(response, "x-oproxy-overhead-ms") or "nan")
    assert 0 <= overhead_ms < total_ms / 4
    await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "llama3.2", "messages": HELLO, "stream": True},
    )
    samples = await scrape(proxy)
    route = "/v1/chat/completions"
    count = value(samples, "oproxy_overhead_seconds_count", route=route)
    overhead_sum = value(samples, "oproxy_overhead_seconds_sum", route=route)
    duration_sum = value(samples, "oproxy_request_duration_seconds_sum", route=route)
    assert count == 2
    assert 0 < overhead_sum < duration_sum / 4


@pytest_twisted.ensureDeferred
async def test_metrics_behind_a_bearer_token(proxy_factory: Any) -> None:
    proxy = proxy_factory(metrics=MetricsConfig(token_sha256=hash_key("scrape-me")))
    response = await proxy.client.get(f"{proxy.url}/metrics")
    assert response.code == 401
    response = await proxy.client.get(
        f"{proxy.url}/metrics", headers={"Authorization": "Bearer scrape-me"}
    )
    assert response.code == 200
    assert b"oproxy_requests_in_flight" in await treq.content(response)


async def get_metrics(proxy: Proxy, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    response = await proxy.client.get(f"{proxy.url}/metrics", headers=headers)
    return response.code, await treq.content(response)


def refused(code: int, body: bytes, status: int, error_code: str) -> bool:
    """An OpenAI error with this status and code, and not a metric in it."""
    error = orjson.loads(body)["error"]
    return (
        code == status
        and error["code"] == error_code
        and error["type"] == "invalid_request_error"
        and b"oproxy_" not in body
    )


@pytest_twisted.ensureDeferred
async def test_metrics_beyond_their_networks_need_the_token_or_an_admin_key(
    proxy_factory: Any, tmp_path: Path
) -> None:
    # The test client is on loopback: networks without loopback make it "elsewhere".
    proxy = proxy_factory(
        metrics=MetricsConfig(allow_networks=("10.0.0.0/8",)),
        auth=AuthConfig(
            keys=(
                APIKey("user", hash_key("sk-user")),
                APIKey("root", hash_key("sk-root"), KeyPolicy(admin=True)),
            )
        ),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    assert refused(*await get_metrics(proxy), 401, "invalid_api_key")
    assert refused(*await get_metrics(proxy, "sk-wrong"), 401, "invalid_api_key")
    assert refused(*await get_metrics(proxy, "sk-user"), 403, "admin_key_required")
    code, body = await get_metrics(proxy, "sk-root")
    assert code == 200 and b"oproxy_requests_in_flight" in body

    # A stored admin key does too; a stored key that is not admin does not.
    now = reactor.seconds()
    admin, record = new_key("ops", KeyPolicy(admin=True), now)
    await proxy.app.guard.store.add_key(record)
    plain, record = new_key("ci", KeyPolicy(), now)
    await proxy.app.guard.store.add_key(record)
    assert (await get_metrics(proxy, admin.token))[0] == 200
    assert refused(*await get_metrics(proxy, plain.token), 403, "admin_key_required")


@pytest_twisted.ensureDeferred
async def test_metrics_beyond_their_networks_need_a_credential_even_without_keys(
    proxy_factory: Any,
) -> None:
    proxy = proxy_factory(metrics=MetricsConfig(allow_networks=()))
    assert refused(*await get_metrics(proxy), 401, "invalid_api_key")
    # While no key exists the API ignores tokens; here a token must be one.
    assert refused(*await get_metrics(proxy, "ollama"), 401, "invalid_api_key")
    chat = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "llama3.2", "messages": HELLO},
        {"Authorization": "Bearer ollama"},
    )
    assert chat[0].code == 200


@pytest_twisted.ensureDeferred
async def test_metrics_token_from_beyond_the_networks(proxy_factory: Any) -> None:
    proxy = proxy_factory(
        metrics=MetricsConfig(token_sha256=hash_key("scrape-me"), allow_networks=("10.0.0.0/8",))
    )
    assert refused(*await get_metrics(proxy), 401, "invalid_api_key")
    assert refused(*await get_metrics(proxy, "scrape-me-not"), 401, "invalid_api_key")
    code, body = await get_metrics(proxy, "scrape-me")
    assert code == 200 and b"oproxy_requests_in_flight" in body


@pytest_twisted.ensureDeferred
async def test_metrics_on_loopback_are_open_by_default_even_with_keys(
    proxy_factory: Any,
) -> None:
    proxy = proxy_factory(auth=AuthConfig(keys=(APIKey("user", hash_key("sk-user")),)))
    code, body = await get_metrics(proxy)
    assert code == 200 and b"oproxy_requests_in_flight" in body
    # A scraper's stale token does not matter where none is needed.
    assert (await get_metrics(proxy, "sk-stale"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_unix_socket_scrapers_count_as_local(proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(metrics=MetricsConfig(allow_networks=()))
    assert (await get_metrics(proxy))[0] == 401  # over TCP, no network is local
    port = reactor.listenUNIX(str(tmp_path / "oproxy.sock"), build_site(proxy.app))
    try:
        client = RawClient()
        await connectProtocol(UNIXClientEndpoint(reactor, str(tmp_path / "oproxy.sock")), client)
        done: defer.Deferred[None] = defer.Deferred()
        client.connectionLost = lambda reason: done.callback(None)  # type: ignore[method-assign]
        client.transport.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await done
        assert client.received.startswith(b"HTTP/1.1 200 ")
        assert b"oproxy_requests_in_flight" in client.received
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_metrics_refuse_two_authorization_headers(proxy_factory: Any) -> None:
    proxy = proxy_factory(metrics=MetricsConfig(token_sha256=hash_key("scrape-me")))
    response = await proxy.client.get(
        f"{proxy.url}/metrics",
        headers={"Authorization": ["Bearer scrape-me", "Bearer other"]},
    )
    body = await treq.content(response)
    assert refused(response.code, body, 400, "multiple_credentials")


@pytest_twisted.ensureDeferred
async def test_the_default_networks_are_loopback_only(proxy: Proxy) -> None:
    guard, auth, default = proxy.app.guard, AuthConfig(), MetricsConfig()
    for address in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "unix"):
        await check_scraper(guard, auth, default, None, address)
    for address in ("192.0.2.10", "10.1.2.3", "2001:db8::1", "::ffff:192.0.2.10"):
        with pytest.raises(Unauthorized):
            await check_scraper(guard, auth, default, None, address)


def test_each_metric_is_held_as_the_kind_it_is_declared() -> None:
    metrics = Metrics(CollectorRegistry())
    declared = Metrics.__annotations__
    assert list(declared) == list(METRICS)
    for attribute, metric in METRICS.items():
        assert declared[attribute] == metric.kind.__name__
        assert type(getattr(metrics, attribute)) is metric.kind


def test_which_peers_are_local() -> None:
    networks = ("10.0.0.0/8", "fd00::/8")
    assert is_local("10.9.8.7", networks) and is_local("::ffff:10.9.8.7", networks)
    assert is_local("fd12::1", networks) and is_local("unix", networks)
    assert not is_local("127.0.0.1", networks) and not is_local("11.0.0.1", networks)
    assert not is_local("not an address", networks)
    assert is_local("unix", ()) and not is_local("127.0.0.1", ())


def test_metrics_token_config() -> None:
    config = load_config("metrics: {bearer_token: '${TOKEN}'}", {"TOKEN": "t0k"})
    assert config.metrics.token_sha256 == hash_key("t0k")
    assert load_config(None, {}).metrics.token_sha256 is None
    assert load_config(None, {}).metrics.allow_networks == ("127.0.0.0/8", "::1/128")


@pytest_twisted.ensureDeferred
async def test_rejections_by_reason(proxy_factory: Any) -> None:
    keys = AuthConfig(keys=(APIKey("a", hash_key("sk-a")),))
    # An oversized body is refused as soon as its head is in, before the
    # key is looked at: the request without a key must fit.
    proxy = proxy_factory(auth=keys, limits=RequestLimits(max_body_bytes=128))
    chat = proxy.v1("chat/completions")
    await post_json(proxy.client, chat, {"model": "llama3.2", "messages": HELLO})
    await post_json(
        proxy.client,
        chat,
        {"model": "llama3.2", "messages": HELLO * 20},
        {"Authorization": "Bearer sk-a"},
    )
    samples = await scrape(proxy)
    assert value(samples, "oproxy_rejections_total", reason="invalid_api_key") == 1
    assert value(samples, "oproxy_rejections_total", reason="request_too_large") == 1


@pytest_twisted.ensureDeferred
async def test_background_probes_keep_backend_gauges_current(proxy: Proxy) -> None:
    probes = ProbeService(proxy.app, reactor, interval=0.05)
    probes.startService()
    try:
        for _ in range(100):
            samples = await scrape(proxy)
            if value(samples, "oproxy_backend_up", backend="local") == 1:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert value(samples, "oproxy_backend_up", backend="local") == 1
    finally:
        probes.stopService()
