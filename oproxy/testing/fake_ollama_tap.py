"""
The earlier name of :mod:`oproxy.testing.ollama.tap`, kept for old imports
and ``twisted/plugins`` entries that name it.
"""

from oproxy.testing.ollama.tap import DEFAULT_LISTEN, Options, makeService

__all__ = ["DEFAULT_LISTEN", "Options", "makeService"]
