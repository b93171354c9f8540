"""
``twistd oproxy-fake-tei`` and ``python -m oproxy.testing.tei``: the
fake text-embeddings-inference as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.tei.server import FakeTEI

Options, makeService, main = KindProcess(
    "fake tei", "oproxy.testing.tei", 3000, FakeTEI.from_command_line
).entry_points()
