"""
``twistd oproxy-fake-tgi`` and ``python -m oproxy.testing.tgi``: the
fake text-generation-inference as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.tgi.server import FakeTGI

Options, makeService, main = KindProcess(
    "fake tgi", "oproxy.testing.tgi", 3000, FakeTGI.from_command_line
).entry_points()
