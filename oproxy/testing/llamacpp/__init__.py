"""
A fake llama.cpp's server (:class:`FakeLlamaCpp`, see :mod:`oproxy.testing.llamacpp.server`);
``python -m oproxy.testing.llamacpp --port N`` or ``twistd oproxy-fake-llamacpp``
runs it as a process.
"""

from oproxy.testing.llamacpp.server import DEFAULT_LLAMACPP_MODEL, FakeLlamaCpp

__all__ = ["DEFAULT_LLAMACPP_MODEL", "FakeLlamaCpp"]
