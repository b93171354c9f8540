"""
``twistd oproxy-fake-vllm`` and ``python -m oproxy.testing.vllm``: the
fake vLLM as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.vllm.server import FakeVLLM

process = KindProcess(
    "fake vllm",
    "oproxy.testing.vllm",
    8000,
    lambda clock, api_key, delay: FakeVLLM(clock, api_key=api_key, token_delay=delay),
)
Options = process.Options
makeService = process.makeService
main = process.main
