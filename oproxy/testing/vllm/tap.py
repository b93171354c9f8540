"""
``twistd oproxy-fake-vllm`` and ``python -m oproxy.testing.vllm``: the
fake vLLM as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.vllm.server import FakeVLLM

Options, makeService, main = KindProcess(
    "fake vllm", "oproxy.testing.vllm", 8000, FakeVLLM.from_command_line
).entry_points()
