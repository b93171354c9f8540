"""
``twistd oproxy-fake-lmstudio`` and ``python -m oproxy.testing.lmstudio``:
the fake LM Studio as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.lmstudio.server import FakeLMStudio

process = KindProcess(
    "fake lmstudio",
    "oproxy.testing.lmstudio",
    1234,
    lambda clock, api_key, delay: FakeLMStudio(clock, api_key=api_key, token_delay=delay),
)
Options = process.Options
makeService = process.makeService
main = process.main
