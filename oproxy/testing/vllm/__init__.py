"""
A fake vLLM (:class:`FakeVLLM`, see :mod:`oproxy.testing.vllm.server`);
``python -m oproxy.testing.vllm --port N`` or ``twistd oproxy-fake-vllm``
runs it as a process.
"""

from oproxy.testing.vllm.server import DEFAULT_VLLM_MODEL, FakeVLLM

__all__ = ["DEFAULT_VLLM_MODEL", "FakeVLLM"]
