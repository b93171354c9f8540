"""
The backend kinds the suites run over: for each, how its fake is started,
which models to ask for, and what it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.server import Site

from oproxy.config import BackendConfig
from oproxy.testing.huggingface import FakeHuggingFaceRouter
from oproxy.testing.llamacpp import FakeLlamaCpp
from oproxy.testing.lmstudio import FakeLMStudio
from oproxy.testing.openai import FakeOpenAI, FakeOpenAIModel
from oproxy.testing.tei import FakeTEI
from oproxy.testing.tgi import FakeTGI
from oproxy.testing.vllm import FakeVLLM
from tests.conftest import Proxy, listen

HF_TOKEN = "hf_kindsuite_secret_0123456789abcdef"
LLAMA = "qwen2.5-7b-instruct-q4_k_m.gguf"


def slow(name: str) -> FakeOpenAIModel:
    """A model that streams a token every 50 ms for long: for cancellation."""
    return FakeOpenAIModel(name, token_delay=0.05, answer_tokens=2000)


#: How a fake is made: the model it serves when it serves one (``None``:
#: its usual one) and what it is for (``chat``, ``slow``, ``embed``).
Maker = Callable[[str], FakeOpenAI]


@dataclass(frozen=True)
class KindCase:
    """
    One kind of backend as the suites use it.

    :ivar kind: the configuration's ``type``.
    :ivar make: builds its fake for a purpose: ``chat``, ``slow`` (a model
        that streams for long, for cancellation) or ``embed``.
    :ivar chat: the model to chat with (``None``: it does not chat).
    :ivar slow: the model that streams for long.
    :ivar embed: the model to embed with (``None``: it has no embeddings).
    :ivar path: what the backend's ``url`` ends with.
    :ivar api_key: the backend's ``api_key``.
    """

    kind: str
    make: Maker
    chat: str | None
    slow: str | None
    embed: str | None
    path: str = ""
    api_key: str | None = None

    def __str__(self) -> str:
        return self.kind


def _lmstudio(purpose: str) -> FakeOpenAI:
    return FakeLMStudio(reactor)


def _llamacpp(purpose: str) -> FakeOpenAI:
    if purpose == "slow":
        return FakeLlamaCpp(reactor, model=slow("slow.gguf"))
    return FakeLlamaCpp(reactor, embedding=True)


def _vllm(purpose: str) -> FakeOpenAI:
    if purpose == "slow":
        return FakeVLLM(reactor, model=slow("org/slow"))
    if purpose == "embed":
        return FakeVLLM(reactor, model=FakeOpenAIModel("BAAI/bge-m3", dimensions=8), task="embed")
    return FakeVLLM(reactor)


def _tgi(purpose: str) -> FakeOpenAI:
    if purpose == "slow":
        return FakeTGI(reactor, model=slow("org/slow"))
    return FakeTGI(reactor)


def _tei(purpose: str) -> FakeOpenAI:
    return FakeTEI(reactor)


def _huggingface(purpose: str) -> FakeOpenAI:
    return FakeHuggingFaceRouter(reactor, token=HF_TOKEN)


KINDS = (
    KindCase(
        "lmstudio",
        _lmstudio,
        "qwen2.5-7b-instruct",
        "slow",
        "text-embedding-nomic-embed-text-v1.5",
        path="/v1",
    ),
    # llama.cpp embeds with the model it chats with (started with --embeddings).
    KindCase("llamacpp", _llamacpp, LLAMA, "slow.gguf", LLAMA),
    KindCase("vllm", _vllm, "Qwen/Qwen2.5-7B-Instruct", "org/slow", "BAAI/bge-m3", path="/v1"),
    KindCase("tgi", _tgi, "HuggingFaceH4/zephyr-7b-beta", "org/slow", None),
    KindCase("tei", _tei, None, None, "BAAI/bge-small-en-v1.5"),
    KindCase(
        "huggingface",
        _huggingface,
        "meta-llama/Llama-3.1-8B-Instruct",
        "org/slow-model",
        None,
        path="/v1",
        api_key=HF_TOKEN,
    ),
)

CHATTING = [pytest.param(k, id=k.kind) for k in KINDS if k.chat is not None]
EMBEDDING = [pytest.param(k, id=k.kind) for k in KINDS if k.embed is not None]


@dataclass
class KindProxy:
    """The proxy in front of one kind's fake."""

    proxy: Proxy
    fake: FakeOpenAI
    case: KindCase


def start_kinds(proxy_factory: Any) -> Iterator[Callable[[KindCase, str], KindProxy]]:
    """
    For a fixture: start a kind's fake and a proxy with it as its one
    backend; stop the fakes afterwards.
    """
    ports: list[Any] = []

    def start(case: KindCase, purpose: str = "chat") -> KindProxy:
        fake = case.make(purpose)
        running = listen(Site(fake.resource()))
        ports.append(running.port)
        backend = BackendConfig(
            name=case.kind, type=case.kind, url=running.url + case.path, api_key=case.api_key
        )
        proxy: Proxy = proxy_factory(backends=(backend,))
        return KindProxy(proxy, fake, case)

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())
