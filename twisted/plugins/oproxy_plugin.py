"""
Register ``twistd oproxy`` and the fakes: ``twistd oproxy-fake-ollama``,
``oproxy-fake-openai``, ``oproxy-fake-lmstudio``, ``oproxy-fake-llamacpp``,
``oproxy-fake-vllm``, ``oproxy-fake-tgi``, ``oproxy-fake-tei`` and
``oproxy-fake-huggingface``.

Twisted finds this module through the ``twisted/plugins/`` directories on
``sys.path``; the makers themselves live in :mod:`oproxy.service_makers`,
where ``oproxy serve`` finds them without that search.
"""

from oproxy.service_makers import (
    oproxy,
    oproxyFakeHuggingFace,
    oproxyFakeLlamaCpp,
    oproxyFakeLMStudio,
    oproxyFakeOllama,
    oproxyFakeOpenAI,
    oproxyFakeTEI,
    oproxyFakeTGI,
    oproxyFakeVLLM,
)

__all__ = [
    "oproxy",
    "oproxyFakeHuggingFace",
    "oproxyFakeLMStudio",
    "oproxyFakeLlamaCpp",
    "oproxyFakeOllama",
    "oproxyFakeOpenAI",
    "oproxyFakeTEI",
    "oproxyFakeTGI",
    "oproxyFakeVLLM",
]
