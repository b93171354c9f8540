"""
A fake text-generation-inference (:class:`FakeTGI`, see :mod:`oproxy.testing.tgi.server`);
``python -m oproxy.testing.tgi --port N`` or ``twistd oproxy-fake-tgi``
runs it as a process.
"""

from oproxy.testing.tgi.server import DEFAULT_TGI_MODEL, FakeTGI

__all__ = ["DEFAULT_TGI_MODEL", "FakeTGI"]
