"""
``twistd oproxy-fake-lmstudio`` and ``python -m oproxy.testing.lmstudio``:
the fake LM Studio as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.lmstudio.server import FakeLMStudio

Options, makeService, main = KindProcess(
    "fake lmstudio", "oproxy.testing.lmstudio", 1234, FakeLMStudio.from_command_line
).entry_points()
