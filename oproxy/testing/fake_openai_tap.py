"""
The earlier name of :mod:`oproxy.testing.openai.tap`, kept for old imports
and ``twisted/plugins`` entries that name it.
"""

from oproxy.testing.openai.tap import DEFAULT_LISTEN, Options, makeService

__all__ = ["DEFAULT_LISTEN", "Options", "makeService"]
