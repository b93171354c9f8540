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

:class:`FakeOpenAI` does the same for an OpenAI-compatible server (OpenAI,
vLLM, llama.cpp, LM Studio): the ``/v1`` routes, SSE streams with
``include_usage``, OpenAI's errors, a bearer key, failure injection.

One package per server kind, on a shared base:

* :mod:`oproxy.testing.ollama` — the fake Ollama; run it with ``python -m
  oproxy.testing.ollama --port N`` or ``twistd oproxy-fake-ollama``;
* :mod:`oproxy.testing.openai` — the fake OpenAI-compatible server;
  ``python -m oproxy.testing.openai --port N`` or ``twistd
  oproxy-fake-openai``;
* :mod:`oproxy.testing.lmstudio`, :mod:`~oproxy.testing.llamacpp`,
  :mod:`~oproxy.testing.vllm`, :mod:`~oproxy.testing.tgi`,
  :mod:`~oproxy.testing.tei`, :mod:`~oproxy.testing.huggingface` — the
  servers oproxy knows by kind, each an extension of the fake
  OpenAI-compatible server with its own routes and quirks; ``python -m
  oproxy.testing.<kind> --port N`` or ``twistd oproxy-fake-<kind>``;
* :mod:`oproxy.testing.base` — what all share: pacing, counters, the
  server skeleton with failure injection, running as a process.

The modules of the earlier flat layout that users import or run
(``fake_ollama``, ``fake_openai``, their ``_tap`` modules and
``fake_models``) remain as aliases of the new ones.
"""

from oproxy.testing.base.answers import embed_vector, raw_embedding
from oproxy.testing.ollama import (
    BROKEN_ERROR,
    CRASH_ERROR,
    DEFAULT_MODELS,
    FakeModel,
    FakeOllama,
    GenerationStats,
    ModelName,
    answer_text,
)
from oproxy.testing.openai import (
    DEFAULT_OPENAI_MODELS,
    FakeOpenAI,
    FakeOpenAIModel,
    FakeOpenAIStats,
)

__all__ = [
    "BROKEN_ERROR",
    "CRASH_ERROR",
    "DEFAULT_MODELS",
    "DEFAULT_OPENAI_MODELS",
    "FakeModel",
    "FakeOllama",
    "FakeOpenAI",
    "FakeOpenAIModel",
    "FakeOpenAIStats",
    "GenerationStats",
    "ModelName",
    "answer_text",
    "embed_vector",
    "raw_embedding",
]
