"""
A fake Hugging Face Inference Providers router (:class:`FakeHuggingFaceRouter`,
see :mod:`oproxy.testing.huggingface.server`); ``python -m
oproxy.testing.huggingface --port N`` or ``twistd oproxy-fake-huggingface``
runs it as a process.
"""

from oproxy.testing.huggingface.server import DEFAULT_ROUTER_MODELS, FakeHuggingFaceRouter

__all__ = ["DEFAULT_ROUTER_MODELS", "FakeHuggingFaceRouter"]
