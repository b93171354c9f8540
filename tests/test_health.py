"""
``/healthz``, ``/readyz`` and ``/v1/health``: cheap probes, never a completion.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import defer, task
from twisted.web.resource import Resource
from twisted.web.server import Site

from oproxy import __version__
from oproxy.config import APIKey, AuthConfig, BackendConfig
from oproxy.health import BackendHealth, probe
from oproxy.security.keys import hash_key
from oproxy.security.policy import KeyPolicy
from tests.conftest import Proxy, listen
from tests.httputil import post_json


async def get(proxy: Proxy, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = await proxy.client.get(f"{proxy.url}{path}", headers=headers)
    return response.code, orjson.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_liveness_and_readiness(proxy: Proxy) -> None:
    assert await get(proxy, "/healthz") == (200, {"status": "ok"})
    code, body = await get(proxy, "/readyz")
    assert code == 200
    assert body == {"status": "ready", "backends_reachable": 1, "state_store_reachable": True}


@pytest_twisted.ensureDeferred
async def test_health_report(proxy: Proxy) -> None:
    await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "llama3.2", "messages": [{"role": "user", "content": "load it"}]},
    )
    started = proxy.fake.stats.started
    code, body = await get(proxy, "/v1/health")
    assert code == 200
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["uptime_seconds"] >= 0
    assert body["workers"] == 1
    (backend,) = body["backends"]
    assert backend["name"] == "local"
    assert backend["reachable"] is True
    assert backend["probe_latency_seconds"] > 0
    assert backend["version"] == "0.12.6"
    assert backend["models_available"] == len(proxy.fake.models)
    assert "llama3.2:latest" in backend["models_loaded"]
    assert proxy.fake.stats.started == started  # probes never generate


@pytest_twisted.ensureDeferred
async def test_unreachable_backend(proxy_factory: Any) -> None:
    dead = listen(Site(Resource()))
    await dead.port.stopListening()
    proxy = proxy_factory(backends=(BackendConfig(name="gone", type="ollama", url=dead.url),))
    code, body = await get(proxy, "/readyz")
    assert code == 503
    assert body["status"] == "not ready"
    code, body = await get(proxy, "/v1/health")
    assert code == 503
    assert body["status"] == "unavailable"
    assert body["backends"][0]["reachable"] is False
    assert "refused" in body["backends"][0]["error"]
    assert await get(proxy, "/healthz") == (200, {"status": "ok"})


@pytest_twisted.ensureDeferred
async def test_health_details_need_a_key_when_keys_exist(proxy_factory: Any) -> None:
    proxy = proxy_factory(auth=AuthConfig(keys=(APIKey("ops", hash_key("sk-ops")),)))
    assert (await get(proxy, "/v1/health"))[0] == 401
    assert (await get(proxy, "/v1/health", {"Authorization": "Bearer sk-ops"}))[0] == 200
    assert (await get(proxy, "/healthz"))[0] == 200
    assert (await get(proxy, "/readyz"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_health_names_only_the_models_a_key_may_use(proxy_factory: Any) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(
            keys=(
                APIKey("ops", hash_key("sk-ops")),
                APIKey("narrow", hash_key("sk-narrow"), KeyPolicy(models=("llama3*",))),
            )
        )
    )
    for model in ("llama3.2", "qwen3"):
        response, _ = await post_json(
            proxy.client,
            proxy.v1("chat/completions"),
            {"model": model, "messages": [{"role": "user", "content": "load it"}]},
            {"Authorization": "Bearer sk-ops"},
        )
        assert response.code == 200
    code, body = await get(proxy, "/v1/health", {"Authorization": "Bearer sk-ops"})
    assert code == 200
    assert sorted(body["backends"][0]["models_loaded"]) == ["llama3.2:latest", "qwen3:latest"]
    code, body = await get(proxy, "/v1/health", {"Authorization": "Bearer sk-narrow"})
    assert code == 200
    assert body["backends"][0]["models_loaded"] == ["llama3.2:latest"]
    # /api/ps, which the health document must not out-tell, says the same.
    response = await proxy.client.get(
        f"{proxy.url}/api/ps", headers={"Authorization": "Bearer sk-narrow"}
    )
    ps = orjson.loads(await treq.content(response))
    assert [m["name"] for m in ps["models"]] == ["llama3.2:latest"]


class SilentBackend:
    """A backend whose probe never answers."""

    name = "silent"

    async def probe(self) -> dict[str, Any]:
        await defer.Deferred()
        raise AssertionError("unreachable")


def test_probe_deadline() -> None:
    clock = task.Clock()
    result = defer.Deferred.fromCoroutine(probe(SilentBackend(), clock, 2.0))  # type: ignore[arg-type]
    clock.advance(1.9)
    assert not result.called
    clock.advance(0.2)
    health: BackendHealth = result.result
    assert health.reachable is False
    assert health.error == "no answer within 2 seconds"
    assert health.latency_seconds == pytest.approx(2.1)
