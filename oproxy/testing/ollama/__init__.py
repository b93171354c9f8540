"""
A faithful fake of Ollama's native REST API: :class:`FakeOllama` (see
:mod:`oproxy.testing.ollama.server`), its models
(:mod:`~oproxy.testing.ollama.models`), and running it as a process
(:mod:`~oproxy.testing.ollama.tap`, ``python -m oproxy.testing.ollama``).
"""

from oproxy.testing.ollama.generation import answer_text
from oproxy.testing.ollama.models import (
    BROKEN_ERROR,
    COLD_LOAD_SECONDS,
    CRASH_ERROR,
    DEFAULT_MODELS,
    FakeModel,
    ModelName,
)
from oproxy.testing.ollama.server import FakeOllama
from oproxy.testing.ollama.stream import GenerationStats

__all__ = [
    "BROKEN_ERROR",
    "COLD_LOAD_SECONDS",
    "CRASH_ERROR",
    "DEFAULT_MODELS",
    "FakeModel",
    "FakeOllama",
    "GenerationStats",
    "ModelName",
    "answer_text",
]
