"""
``twistd oproxy-fake-llamacpp`` and ``python -m oproxy.testing.llamacpp``: the
fake llama.cpp's server as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.llamacpp.server import FakeLlamaCpp

process = KindProcess(
    "fake llama.cpp",
    "oproxy.testing.llamacpp",
    8080,
    lambda clock, api_key, delay: FakeLlamaCpp(clock, api_key=api_key, token_delay=delay),
)
Options = process.Options
makeService = process.makeService
main = process.main
