"""
``twistd oproxy-fake-llamacpp`` and ``python -m oproxy.testing.llamacpp``: the
fake llama.cpp's server as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.llamacpp.server import FakeLlamaCpp

Options, makeService, main = KindProcess(
    "fake llama.cpp", "oproxy.testing.llamacpp", 8080, FakeLlamaCpp.from_command_line
).entry_points()
