"""
The steps every request goes through (:mod:`oproxy.web.pipeline`), over
the route table (:mod:`oproxy.web.routes`).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest_twisted
import treq
from attrs import evolve
from twisted.internet import defer, reactor, task
from twisted.web.server import Site

from oproxy.api.scope import Scope
from oproxy.config import AuthConfig
from oproxy.web.dialects import OLLAMA
from oproxy.web.pipeline import Endpoint
from oproxy.web.routes import ROUTES, Document, Files, klein_app
from tests.conftest import Proxy, listen


async def until(condition: Any) -> None:
    while not condition():
        await task.deferLater(reactor, 0.001, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_request_in_flight_keeps_the_services_it_started_with(proxy: Proxy) -> None:
    app = proxy.app
    started_with = app.config
    released: defer.Deferred[None] = defer.Deferred()
    waiting: list[Scope] = []

    async def wait(scope: Scope) -> bytes | None:
        waiting.append(scope)
        await released
        return scope.json({"drain_timeout": scope.config.drain_timeout})

    async def now(scope: Scope) -> bytes | None:
        return scope.json({"drain_timeout": scope.config.drain_timeout})

    routes = [
        Endpoint("/wait", ("GET",), wait, authenticates=False),
        Endpoint("/now", ("GET",), now, authenticates=False),
    ]
    running = listen(Site(klein_app(app.pipeline, routes).resource()))
    try:
        first = proxy.client.get(f"{running.url}/wait")
        await until(lambda: waiting)
        reloaded = evolve(started_with, drain_timeout=started_with.drain_timeout + 7)
        app.swap(reloaded, app.router, app.cache)
        after = await proxy.client.get(f"{running.url}/now")
        assert orjson.loads(await treq.content(after)) == {"drain_timeout": reloaded.drain_timeout}
        released.callback(None)
        before = await first
        assert orjson.loads(await treq.content(before)) == {
            "drain_timeout": started_with.drain_timeout
        }
        assert waiting[0].services is not app.services
        assert waiting[0].services.config is started_with
    finally:
        await running.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_key_is_checked_before_the_body_is_read(proxy_factory: Any) -> None:
    proxy: Proxy = proxy_factory(auth=AuthConfig(require_keys=True))
    for path in ("/v1/chat/completions", "/api/chat"):
        response = await proxy.client.post(
            f"{proxy.url}{path}", data=b"{not json", headers={"Content-Type": "text/plain"}
        )
        assert response.code == 401
        await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_the_metrics_scrape_does_not_count_itself(proxy: Proxy) -> None:
    for _ in range(2):
        response = await proxy.client.get(f"{proxy.url}/metrics")
        assert response.code == 200
        assert response.headers.getRawHeaders("x-request-id")
        text = (await treq.content(response)).decode()
    await proxy.settled()
    assert "oproxy_requests_in_flight 0.0" in text
    assert "oproxy_requests_total{" not in text
    registry = proxy.app.metrics.registry
    assert registry is not None
    assert registry.get_sample_value("oproxy_requests_in_flight") == 0.0


@pytest_twisted.ensureDeferred
async def test_an_error_answer_is_in_the_routes_dialect(proxy: Proxy) -> None:
    openai = await proxy.client.post(
        f"{proxy.url}/v1/chat/completions",
        data=b"[]",
        headers={"Content-Type": "application/json"},
    )
    body = await treq.content(openai)
    assert openai.code == 400
    assert orjson.loads(body)["error"]["code"] == "invalid_json"
    ollama = await proxy.client.post(
        f"{proxy.url}/api/chat", data=b"[]", headers={"Content-Type": "application/json"}
    )
    body = await treq.content(ollama)
    assert ollama.code == 400
    assert orjson.loads(body) == {"error": "The request body must be a JSON object."}
    assert ollama.headers.getRawHeaders("content-type") == [OLLAMA.content_type.decode()]


def test_the_route_table_names_each_path_and_method_once() -> None:
    seen = set()
    for route in ROUTES:
        methods = route.methods if isinstance(route, Endpoint) else ("GET",)
        for method in methods:
            assert (route.path, method) not in seen
            seen.add((route.path, method))
    native = [r for r in ROUTES if isinstance(r, Endpoint) and r.path.startswith("/api/")]
    assert native and all(r.dialect is OLLAMA and r.label == r.path for r in native)
    assert {type(r) for r in ROUTES} == {Endpoint, Document, Files}


def test_every_route_is_broken_out_in_the_metrics_by_a_bounded_label() -> None:
    labels = {route.path: route.label for route in ROUTES if isinstance(route, Endpoint)}
    assert labels["/v1/embeddings"] == "/v1/embeddings"
    assert labels["/v1/models/<path:model_id>"] == "/v1/models/{model_id}"
    assert labels["/admin/keys/<key_id>"] == "/admin/keys/{id}"
    assert all(label.startswith("/") and "<" not in label for label in labels.values())
