"""
Routing decisions in memory: rules, circuits, discovery, balancing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from zope.interface import implementer

from oproxy.backends.base import IImplicitLatest, IRuntimeOptions
from oproxy.config import ConfigError, ModelRule, RoutingConfig, load_config
from oproxy.errors import BackendsDown, ModelNotFound
from oproxy.health import BackendHealth
from oproxy.routing.breaker import GO, Outcome
from oproxy.routing.catalog import name_forms
from oproxy.routing.router import Route, Router, RoutingState


@implementer(IImplicitLatest, IRuntimeOptions)
@dataclass
class Stub:
    """
    A backend that only lists models (routing never calls anything else),
    with the naming and options of an Ollama.
    """

    name: str
    models: list[str]
    weight: int = 1
    listed: int = field(default=0)

    async def list_models(self) -> list[dict[str, Any]]:
        self.listed += 1
        return [{"id": m, "object": "model", "owned_by": self.name} for m in self.models]


def router(backends: list[Stub], clock: task.Clock | None = None, **config: Any) -> Router:
    clock = clock or task.Clock()
    routing = RoutingConfig(**config)
    return Router(backends, routing, RoutingState.new(clock, routing))  # type: ignore[arg-type]


async def names(r: Router, model: str) -> list[str]:
    return [route.backend.name for route in await r.routes(model)]


def test_ollama_names_with_and_without_latest() -> None:
    assert name_forms("llama3.2") == ("llama3.2", "llama3.2:latest")
    assert name_forms("llama3.2:latest") == ("llama3.2:latest", "llama3.2")
    assert name_forms("qwen3:8b") == ("qwen3:8b",)


@pytest_twisted.ensureDeferred
async def test_only_backends_that_serve_a_model_get_it() -> None:
    a, b = Stub("a", ["llama3.2:latest"]), Stub("b", ["qwen3:8b"])
    r = router([a, b])
    assert await names(r, "llama3.2") == ["a"]
    assert await names(r, "qwen3:8b") == ["b"]
    with pytest.raises(ModelNotFound):
        await r.routes("nope")


@pytest_twisted.ensureDeferred
async def test_a_model_pulled_a_moment_ago_is_found() -> None:
    clock = task.Clock()
    a = Stub("a", ["llama3.2:latest"])
    r = router([a], clock)
    await r.routes("llama3.2")
    a.models.append("new:latest")
    with pytest.raises(ModelNotFound):
        await r.routes("new")  # the list is fresh: not re-read at once
    clock.advance(10)
    assert await names(r, "new") == ["a"]


@pytest_twisted.ensureDeferred
async def test_weighted_round_robin() -> None:
    backends = [Stub("a", ["m:latest"], weight=2), Stub("b", ["m:latest"]), Stub("c", ["m:latest"])]
    r = router(backends)
    firsts = Counter([(await names(r, "m"))[0] for _ in range(400)])
    assert firsts == {"a": 200, "b": 100, "c": 100}
    # Every order holds every backend once.
    assert sorted(await names(r, "m")) == ["a", "b", "c"]


@pytest_twisted.ensureDeferred
async def test_least_busy_and_prefer_warm() -> None:
    a, b = Stub("a", ["m:latest"]), Stub("b", ["m:latest"])
    r = router([a, b], strategy="least-busy")
    await r.routes("m")
    route_a = Route(a, "m")  # type: ignore[arg-type]
    r.started(route_a)
    assert [(await names(r, "m"))[0] for _ in range(4)] == ["b"] * 4
    r.finished(route_a)

    warm = router([a, b], strategy="prefer-warm")
    warm.note_probes(
        [
            BackendHealth("a", True, 0.01, models_loaded=()),
            BackendHealth("b", True, 0.01, models_loaded=("m:latest",)),
        ]
    )
    assert [(await names(warm, "m"))[0] for _ in range(4)] == ["b"] * 4


@pytest_twisted.ensureDeferred
async def test_aliases_backend_patterns_and_fallbacks() -> None:
    gpu1, gpu2, cpu = (
        Stub("gpu-1", ["llama3.2:3b", "qwen3:8b"]),
        Stub("gpu-2", ["llama3.2:3b"]),
        Stub("cpu", ["llama3.2:3b", "qwen3:0.6b"]),
    )
    r = router(
        [gpu1, gpu2, cpu],
        models=(
            ModelRule(
                "gpt-4o-mini",
                target="llama3.2:3b",
                backends=("gpu-*",),
                fallbacks=("small",),
                options=(("num_ctx", 8192),),
            ),
            ModelRule("small", target="qwen3:0.6b"),
        ),
    )
    routes = await r.routes("gpt-4o-mini")
    assert [(x.backend.name, x.upstream_model, x.client_model) for x in routes] == [
        ("gpu-1", "llama3.2:3b", "gpt-4o-mini"),
        ("gpu-2", "llama3.2:3b", "gpt-4o-mini"),
        ("cpu", "qwen3:0.6b", "small"),
    ]
    merged = routes[0].body({"model": "gpt-4o-mini", "options": {"top_k": 5}})
    assert merged["options"] == {"top_k": 5, "num_ctx": 8192}
    assert r.pool_name("gpt-4o-mini") == "llama3.2:3b@gpu-1,gpu-2"


@pytest_twisted.ensureDeferred
async def test_every_backend_down_fails_fast() -> None:
    clock = task.Clock()
    a, b = Stub("a", ["m:latest"]), Stub("b", ["m:latest"])
    r = router([a, b], clock, breaker_failures=1, breaker_cooldown=20)
    for route in await r.routes("m"):
        r.report(route, GO, Outcome.BACKEND_DOWN)
    with pytest.raises(BackendsDown) as down:
        await r.routes("m")
    assert down.value.status == 503 and down.value.headers["retry-after"] == "20"
    assert "a, b" in down.value.message
    clock.advance(20)
    assert len(await r.routes("m")) == 2


@pytest_twisted.ensureDeferred
async def test_a_failing_model_leaves_its_backend_to_the_other_models() -> None:
    clock = task.Clock()
    a, b = Stub("a", ["m:latest", "n:latest"]), Stub("b", ["m:latest"])
    r = router([a, b], clock, breaker_failures=2, breaker_cooldown=20)
    for _ in range(2):
        (on_a,) = [route for route in await r.routes("m") if route.backend.name == "a"]
        r.report(on_a, GO, Outcome.MODEL_FAILED)
    assert await names(r, "m") == ["b"]  # "m" and "m:latest" are one circuit
    assert await names(r, "m:latest") == ["b"]
    assert await names(r, "n") == ["a"]
    r.report((await r.routes("m"))[0], GO, Outcome.MODEL_FAILED)
    r.report((await r.routes("m"))[0], GO, Outcome.MODEL_FAILED)
    with pytest.raises(BackendsDown) as down:
        await r.routes("m")
    assert down.value.headers["retry-after"] == "20"
    assert await names(r, "n") == ["a"]


def test_models_and_routing_settings() -> None:
    config = load_config(
        """
backends:
  - {name: gpu-1, url: "http://10.0.0.1:11434", weight: 3}
  - {name: lmstudio, type: openai, url: "http://10.0.0.2:1234/v1", api_key: sk-lm}
models:
  gpt-4o-mini:
    target: llama3.2:3b
    backends: [gpu-*]
    strategy: prefer-warm
    options: {num_ctx: 8192, temperature: 0.2}
    fallbacks: [qwen3:8b]
routing:
  strategy: least-busy
  retries: 1
  circuit_breaker: {failures: 5, cooldown: 10}
""",
        {},
    )
    assert [b.weight for b in config.backends] == [3, 1]
    assert config.backends[1].api_key == "sk-lm" and "sk-lm" not in repr(config.backends[1])
    assert config.routing.strategy == "least-busy" and config.routing.retries == 1
    assert (config.routing.breaker_failures, config.routing.breaker_cooldown) == (5, 10.0)
    rule = config.routing.rule_for("gpt-4o-mini")
    assert rule is not None and rule.target == "llama3.2:3b" and rule.strategy == "prefer-warm"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("models: {x: {backends: [nowhere]}}", "models.x.backends[0]"),
        ("models: {x: {strategy: random}}", "models.x.strategy"),
        ("models: {x: {fallbacks: [x]}}", "models.x.fallbacks"),
        ("models: {x: {tagret: y}}", "models.x.tagret"),
        ("routing: {retries: -1}", "routing.retries"),
        ("backends: [{url: 'ftp://x', type: openai}]", "backends[0].url"),
        ("backends: [{url: 'http://u:p@x/v1', type: openai}]", "backends[0].url"),
        ("backends: [{url: 'http://x', type: triton}]", "backends[0].type"),
    ],
)
def test_bad_routing_settings_name_the_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text, {})
    assert caught.value.key == where


@dataclass
class Unlisted(Stub):
    """A backend whose model list cannot be had (an older server, a proxy in between)."""

    async def list_models(self) -> list[dict[str, Any]]:
        self.listed += 1
        raise RuntimeError("no /api/tags here")


@pytest_twisted.ensureDeferred
async def test_a_backend_that_cannot_list_is_still_used_and_not_asked_every_time() -> None:
    clock = task.Clock()
    quiet = Unlisted("quiet", [])
    r = router([quiet], clock)
    for _ in range(20):
        assert await names(r, "anything") == ["quiet"]  # its own answer will tell
    assert quiet.listed == 1
    clock.advance(6)
    await r.routes("anything")
    assert quiet.listed == 2


@pytest_twisted.ensureDeferred
async def test_a_probe_answered_with_an_error_keeps_the_backend() -> None:
    a = Stub("a", ["m:latest"])
    r = router([a])
    r.note_probes([BackendHealth("a", False, 0.01, error="HTTP 404", answered=True)])
    assert await names(r, "m") == ["a"]
    r.note_probes([BackendHealth("a", False, 2.0, error="connection refused")])
    with pytest.raises(BackendsDown):
        await r.routes("m")
