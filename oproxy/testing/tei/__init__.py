"""
A fake text-embeddings-inference (:class:`FakeTEI`, see :mod:`oproxy.testing.tei.server`);
``python -m oproxy.testing.tei --port N`` or ``twistd oproxy-fake-tei``
runs it as a process.
"""

from oproxy.testing.tei.server import DEFAULT_TEI_MODEL, FakeTEI

__all__ = ["DEFAULT_TEI_MODEL", "FakeTEI"]
