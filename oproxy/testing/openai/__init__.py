"""
A fake OpenAI-compatible server (OpenAI, vLLM, llama.cpp's server, LM
Studio): :class:`FakeOpenAI` (see :mod:`oproxy.testing.openai.server`), its
models (:mod:`~oproxy.testing.openai.models`), and running it as a process
(:mod:`~oproxy.testing.openai.tap`, ``python -m oproxy.testing.openai``).
"""

from oproxy.testing.openai.models import BROKEN_MESSAGE, DEFAULT_OPENAI_MODELS, FakeOpenAIModel
from oproxy.testing.openai.server import FakeOpenAI
from oproxy.testing.openai.wire import FakeOpenAIStats

__all__ = [
    "BROKEN_MESSAGE",
    "DEFAULT_OPENAI_MODELS",
    "FakeOpenAI",
    "FakeOpenAIModel",
    "FakeOpenAIStats",
]
