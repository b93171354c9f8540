"""
Test doubles for the things oproxy talks to, public so that users can run
their own CI against them.

:class:`FakeOllama` is a faithful fake of Ollama's native REST API (the
wire format, error messages and status codes of the Go server), with
deterministic answers and a few deliberately misbehaving models
(``slow:latest``, ``stall:latest``, ``broken:latest``, ``crash:latest``)::

    from twisted.internet import reactor
    from twisted.web.server import Site
    from oproxy.testing import FakeOllama

    fake = FakeOllama(reactor)
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")

Run it as a process with ``python -m oproxy.testing.fake_ollama --port N``,
or with ``twistd`` through :mod:`oproxy.testing.fake_ollama_tap`.

:class:`FakeOpenAI` does the same for an OpenAI-compatible server (OpenAI,
vLLM, llama.cpp, LM Studio): the ``/v1`` routes, SSE streams with
``include_usage``, OpenAI's errors, a bearer key, failure injection (see
:mod:`oproxy.testing.fake_openai`).  Run it with ``python -m
oproxy.testing.fake_openai --port N`` or through
:mod:`oproxy.testing.fake_openai_tap`.
"""

from typing import TYPE_CHECKING, Any

from oproxy.testing.fake_generation import answer_text, embed_vector, raw_embedding
from oproxy.testing.fake_models import (
    BROKEN_ERROR,
    CRASH_ERROR,
    DEFAULT_MODELS,
    FakeModel,
    ModelName,
)
from oproxy.testing.fake_stream import GenerationStats

if TYPE_CHECKING:
    from oproxy.testing.fake_ollama import FakeOllama
    from oproxy.testing.fake_openai import FakeOpenAI


def __getattr__(name: str) -> Any:
    # FakeOllama is imported lazily so that ``python -m
    # oproxy.testing.fake_ollama`` does not find its own module already
    # imported by the package (runpy warns about that on stderr).
    if name == "FakeOllama":
        from oproxy.testing.fake_ollama import FakeOllama

        return FakeOllama
    if name == "FakeOpenAI":
        from oproxy.testing.fake_openai import FakeOpenAI

        return FakeOpenAI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BROKEN_ERROR",
    "CRASH_ERROR",
    "DEFAULT_MODELS",
    "FakeModel",
    "FakeOllama",
    "FakeOpenAI",
    "GenerationStats",
    "ModelName",
    "answer_text",
    "embed_vector",
    "raw_embedding",
]
