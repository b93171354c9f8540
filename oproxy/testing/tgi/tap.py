"""
``twistd oproxy-fake-tgi`` and ``python -m oproxy.testing.tgi``: the
fake text-generation-inference as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.tgi.server import FakeTGI

process = KindProcess(
    "fake tgi",
    "oproxy.testing.tgi",
    3000,
    lambda clock, api_key, delay: FakeTGI(clock, api_key=api_key, token_delay=delay),
)
Options = process.Options
makeService = process.makeService
main = process.main
