"""
``GET /metrics``: what a Prometheus scrape sees after traffic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task

from oproxy.config import MetricsConfig, RequestLimits, load_config
from oproxy.health import ProbeService
from oproxy.security.settings import APIKey, AuthConfig, hash_key
from tests.conftest import Proxy
from tests.httputil import header, post_json

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


def test_metrics_token_config() -> None:
    config = load_config("metrics: {bearer_token: '${TOKEN}'}", {"TOKEN": "t0k"})
    assert config.metrics.token_sha256 == hash_key("t0k")
    assert load_config(None, {}).metrics.token_sha256 is None


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
