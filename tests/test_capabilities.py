"""
What backends say they can do (:mod:`oproxy.backends.base`), and that the
proxy asks that, not which class a backend is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest_twisted
from twisted.internet import reactor, task
from twisted.web.client import Agent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from oproxy.backends.base import (
    IBackend,
    IImplicitLatest,
    IInlineImages,
    IModelManagement,
    INativeOllama,
    IRuntimeOptions,
)
from oproxy.backends.ollama import OllamaBackend
from oproxy.backends.openai import OpenAIBackend
from oproxy.config import AuthConfig, BackendConfig, StateConfig
from oproxy.routing.router import Router, RoutingState
from tests.conftest import Proxy
from tests.test_native import CHAT, bearer, call, key

CAPABILITIES = (INativeOllama, IModelManagement, IImplicitLatest, IRuntimeOptions, IInlineImages)


def test_an_ollama_backend_can_do_everything_ollama_does(proxy: Proxy) -> None:
    (backend,) = proxy.app.router.backends
    assert isinstance(backend, OllamaBackend)
    assert verifyObject(IBackend, backend)
    assert all(capability.providedBy(backend) for capability in CAPABILITIES)


def test_an_openai_backend_speaks_only_openai() -> None:
    config = BackendConfig(name="vllm", type="openai", url="http://127.0.0.1:8000/v1")
    backend = OpenAIBackend(config, Agent(reactor), task.Clock())
    assert verifyObject(IBackend, backend)
    assert not any(capability.providedBy(backend) for capability in CAPABILITIES)


@implementer(INativeOllama, IImplicitLatest)
class NativeOnly:
    """
    A server that speaks Ollama's native API but whose models may not be
    managed through the proxy; not an :class:`OllamaBackend`.
    """

    def __init__(self, ollama: Any) -> None:
        self._ollama = ollama
        self.upstream = ollama.upstream
        self.weight = ollama.weight

    @property
    def name(self) -> str:
        name: str = self._ollama.name
        return name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._ollama, attribute)


@pytest_twisted.ensureDeferred
async def test_native_routes_go_to_what_speaks_ollama_and_management_to_what_allows_it(
    proxy_factory: Any, tmp_path: Path
) -> None:
    proxy: Proxy = proxy_factory(
        auth=AuthConfig(keys=(key("root", "sk-root", admin=True),)),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    app = proxy.app
    (ollama,) = app.router.backends
    routing = app.config.routing
    router = Router([NativeOnly(ollama)], routing, RoutingState.new(reactor, routing))
    app.swap(app.config, router, app.cache)

    response, raw = await call(
        proxy, "POST", "/api/chat", {**CHAT, "stream": False}, bearer("sk-root")
    )
    assert response.code == 200
    assert orjson.loads(raw)["message"]["role"] == "assistant"
    response, raw = await call(proxy, "GET", "/api/tags", None, bearer("sk-root"))
    assert response.code == 200
    assert "llama3.2:latest" in {m["name"] for m in orjson.loads(raw)["models"]}

    response, raw = await call(proxy, "POST", "/api/pull", {"model": "gemma3"}, bearer("sk-root"))
    assert (response.code, orjson.loads(raw)) == (400, {"error": "no Ollama backend is configured"})
    assert "gemma3:latest" not in proxy.fake.models
