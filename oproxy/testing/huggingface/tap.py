"""
``twistd oproxy-fake-huggingface`` and ``python -m oproxy.testing.huggingface``: the
fake Inference Providers router as a process (see
:class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.huggingface.server import FakeHuggingFaceRouter

Options, makeService, main = KindProcess(
    "fake huggingface router",
    "oproxy.testing.huggingface",
    8000,
    FakeHuggingFaceRouter.from_command_line,
).entry_points()
