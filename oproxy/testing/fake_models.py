"""
The earlier name of :mod:`oproxy.testing.ollama.models`, kept for old imports.
"""

from oproxy.testing.ollama.models import (
    BROKEN_ERROR,
    COLD_LOAD_SECONDS,
    CRASH_ERROR,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MODELS,
    DEFAULT_NUM_CTX,
    Catalogue,
    FakeModel,
    LoadedModels,
    ModelName,
)

__all__ = [
    "BROKEN_ERROR",
    "COLD_LOAD_SECONDS",
    "CRASH_ERROR",
    "DEFAULT_KEEP_ALIVE",
    "DEFAULT_MODELS",
    "DEFAULT_NUM_CTX",
    "Catalogue",
    "FakeModel",
    "LoadedModels",
    "ModelName",
]
