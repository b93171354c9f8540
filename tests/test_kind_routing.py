"""
Routing that asks the backends what they know: ``prefer-warm`` reads LM
Studio's loaded state, ``least-busy`` vLLM's queue and llama.cpp's slots;
``/v1/models`` right after start has every backend's models; the load
estimate and its reading by the probe service.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.server import Site

from oproxy.api import models as models_api
from oproxy.backends.base import IBusyness, Load
from oproxy.config import BackendConfig, RoutingConfig
from oproxy.health import ProbeService
from oproxy.routing.router import LOAD_STALE_SECONDS, Router, RoutingState
from oproxy.testing.llamacpp import FakeLlamaCpp
from oproxy.testing.lmstudio import FakeLMStudio
from oproxy.testing.openai import FakeOpenAI
from oproxy.testing.vllm import FakeVLLM
from tests.conftest import Proxy, listen
from tests.httputil import header, post_json

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def pool(proxy_factory: Any) -> Iterator[Any]:
    """A proxy over several fakes of one kind, each its own backend (a, b...)."""
    ports: list[Any] = []

    def start(kind: str, fakes: list[FakeOpenAI], **routing: Any) -> Proxy:
        backends = []
        for name, fake in zip("abcdef", fakes, strict=False):
            running = listen(Site(fake.resource()))
            ports.append(running.port)
            backends.append(BackendConfig(name=name, type=kind, url=running.url))
        proxy: Proxy = proxy_factory(backends=tuple(backends), routing=RoutingConfig(**routing))
        return proxy

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


async def answered_by(proxy: Proxy, model: str, times: int) -> list[str | None]:
    served = []
    for _ in range(times):
        response, raw = await post_json(
            proxy.client, proxy.v1("chat/completions"), {"model": model, "messages": HELLO}
        )
        assert response.code == 200, raw
        served.append(header(response, "x-oproxy-backend"))
    return served


# --------------------------------------------------------------------------
# prefer-warm


@pytest_twisted.ensureDeferred
async def test_prefer_warm_goes_where_lmstudio_has_the_model_loaded(pool: Any) -> None:
    cold = FakeLMStudio(reactor, loaded=["qwen2.5-7b-instruct"])
    warm = FakeLMStudio(reactor, loaded=["llama-3.2-3b-instruct"])
    proxy = pool("lmstudio", [cold, warm], strategy="prefer-warm")
    assert await answered_by(proxy, "llama-3.2-3b-instruct", 4) == ["b"] * 4
    assert cold.loads == 0  # nothing was loaded where it was cold
    assert await answered_by(proxy, "qwen2.5-7b-instruct", 3) == ["a"] * 3


# --------------------------------------------------------------------------
# least-busy


@pytest_twisted.ensureDeferred
async def test_least_busy_reads_vllm_queue_depth(pool: Any) -> None:
    queued, idle = FakeVLLM(reactor), FakeVLLM(reactor)
    queued.waiting = 12
    proxy = pool("vllm", [queued, idle], strategy="least-busy")
    await proxy.app.router.refresh_loads()
    assert await answered_by(proxy, "Qwen/Qwen2.5-7B-Instruct", 4) == ["b"] * 4
    queued.waiting = 0
    idle.running_elsewhere = 9
    await proxy.app.router.refresh_loads()
    assert await answered_by(proxy, "Qwen/Qwen2.5-7B-Instruct", 3) == ["a"] * 3


@pytest_twisted.ensureDeferred
async def test_least_busy_reads_llamacpp_slots(pool: Any) -> None:
    full, free = FakeLlamaCpp(reactor, slots=4), FakeLlamaCpp(reactor, slots=4)
    full.busy_elsewhere = 4
    proxy = pool("llamacpp", [full, free], strategy="least-busy")
    await proxy.app.router.refresh_loads()
    assert await answered_by(proxy, full.model.id, 4) == ["b"] * 4


def test_the_load_estimate_counts_others_and_forgets_old_reports() -> None:
    clock = task.Clock()
    routing = RoutingConfig(strategy="least-busy")
    state = RoutingState.new(clock, routing)
    backend = _Named("a")
    router = Router([backend, _Named("b")], routing, state)
    state.busy["a"] = 2
    router.note_load("a", Load(running=7, waiting=3))  # two of the ten are ours
    assert router.load_of(backend) == 10
    state.busy["a"] = 1  # one of ours finished: the others' eight remain
    assert router.load_of(backend) == 9
    clock.advance(LOAD_STALE_SECONDS + 1)
    assert router.load_of(backend) == 1


class _Named:
    """A backend as routing sees it: a name and a weight."""

    weight = 1
    kind = "openai"

    def __init__(self, name: str) -> None:
        self.name = name


@pytest_twisted.ensureDeferred
async def test_the_probe_service_reads_loads(pool: Any) -> None:
    fake = FakeVLLM(reactor)
    fake.waiting = 5
    proxy = pool("vllm", [fake, FakeVLLM(reactor)], strategy="least-busy")
    router = proxy.app.router
    assert router.reports_load and all(IBusyness.providedBy(b) for b in router.backends)
    service = ProbeService(proxy.app, reactor, interval=3600, load_interval=0.05)
    service.startService()
    try:
        for _ in range(250):
            if router.state.reported.get("a") is not None:
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert router.state.reported["a"].requests == 5
        assert router.state.reported["b"].requests == 0
    finally:
        await service.stopService()


# --------------------------------------------------------------------------
# /v1/models right after start


@pytest_twisted.ensureDeferred
async def test_models_right_after_start_include_every_backend(
    proxy_factory: Any, fake_ollama: Any
) -> None:
    """
    The probe service starts every backend's first listing as the process
    starts; a ``/v1/models`` that comes meanwhile waits for them rather
    than answering without the slow one's models.
    """
    slow = FakeOpenAI(reactor, list_delay=0.3)
    running = listen(Site(slow.resource()))
    backends = (
        BackendConfig(name="ollama", type="ollama", url=fake_ollama[1]),
        BackendConfig(name="remote", type="openai", url=running.url + "/v1"),
    )
    proxy: Proxy = proxy_factory(backends=backends)
    service = ProbeService(proxy.app, reactor)
    service.startService()
    try:
        # The probe's first reading of the slow backend's list is under way.
        while not any(r.path == "/v1/models" for r in slow.stats.requests):
            await deferLater(reactor, 0.01, lambda: None)
        response = await proxy.client.get(proxy.v1("models"))
        listed = {m["id"]: m["owned_by"] for m in orjson.loads(await response.content())["data"]}
    finally:
        await service.stopService()
        await running.port.stopListening()
    assert listed.get("gpt-fake") == "remote"
    assert listed.get("llama3.2:latest") == "ollama"
    assert len([r for r in slow.stats.requests if r.path == "/v1/models"]) == 1  # read once


@pytest_twisted.ensureDeferred
async def test_models_do_not_wait_long_for_a_backend_that_does_not_list(
    proxy_factory: Any, fake_ollama: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_api, "FIRST_LISTING_SECONDS", 0.2)
    stuck = FakeOpenAI(reactor, list_delay=3600)
    running = listen(Site(stuck.resource()))
    backends = (
        BackendConfig(name="ollama", type="ollama", url=fake_ollama[1]),
        BackendConfig(name="stuck", type="openai", url=running.url + "/v1"),
    )
    proxy: Proxy = proxy_factory(backends=backends)
    try:
        response = await proxy.client.get(proxy.v1("models"))
        listed = {m["id"] for m in orjson.loads(await response.content())["data"]}
    finally:
        stuck.abandon_all()
        await running.port.stopListening()
    assert response.code == 200
    assert "llama3.2:latest" in listed and "gpt-fake" not in listed


@pytest_twisted.ensureDeferred
async def test_a_listing_is_shared_and_cancelled_only_when_nobody_waits() -> None:
    clock = task.Clock()
    routing = RoutingConfig()
    state = RoutingState.new(clock, routing)
    listing: Deferred[list[dict[str, Any]]] = Deferred()
    backend = _Listing("a", listing)
    first = Deferred.fromCoroutine(state.catalog.refresh([backend]))
    second = Deferred.fromCoroutine(state.catalog.refresh([backend]))
    assert backend.asked == 1
    first.cancel()
    first.addErrback(lambda _: None)
    assert not listing.called  # the second still waits
    listing.callback([{"id": "m"}])
    await second
    assert state.catalog.serves("a", "m")


class _Listing(_Named):
    def __init__(self, name: str, listing: Deferred[list[dict[str, Any]]]) -> None:
        super().__init__(name)
        self.listing = listing
        self.asked = 0

    async def list_models(self) -> list[dict[str, Any]]:
        self.asked += 1
        return await self.listing
