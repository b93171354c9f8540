"""
``twistd oproxy-fake-huggingface`` and ``python -m oproxy.testing.huggingface``: the
fake Inference Providers router as a process (see
:class:`~oproxy.testing.base.serving.KindProcess`).
"""

from oproxy.testing.base.serving import KindProcess
from oproxy.testing.huggingface.server import FakeHuggingFaceRouter

process = KindProcess(
    "fake huggingface router",
    "oproxy.testing.huggingface",
    8000,
    lambda clock, api_key, delay: FakeHuggingFaceRouter(
        clock, token=api_key or "hf_fake_token_0123456789", token_delay=delay
    ),
)
Options = process.Options
makeService = process.makeService
main = process.main
