"""
``twistd oproxy-fake-tei`` and ``python -m oproxy.testing.tei``: the
fake text-embeddings-inference as a process (see :class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.tei.server import FakeTEI

process = KindProcess(
    "fake tei",
    "oproxy.testing.tei",
    3000,
    lambda clock, api_key, delay: FakeTEI(clock, api_key=api_key),
)
Options = process.Options
makeService = process.makeService
main = process.main
