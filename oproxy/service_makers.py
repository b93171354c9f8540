"""
The ``twistd`` service makers: the daemon and the two fake servers.

They live in the package, not only in ``twisted/plugins/``, so that
``oproxy serve`` runs the daemon without Twisted's plugin discovery (which
sees only ``twisted/plugins/`` directories on ``sys.path``).  This module is
imported by every ``twistd`` invocation that scans plugins, so it imports
nothing heavy: each maker names its module by string.
"""

from twisted.application.service import ServiceMaker

oproxy = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy",
    "oproxy.tap",
    "An OpenAI-compatible gateway in front of Ollama and other model servers.",
    "oproxy",
)

oproxyFakeOllama = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake Ollama",
    "oproxy.testing.ollama.tap",
    "A faithful fake Ollama server, for testing clients and oproxy itself.",
    "oproxy-fake-ollama",
)

oproxyFakeOpenAI = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake OpenAI-compatible server",
    "oproxy.testing.openai.tap",
    "A fake OpenAI-compatible server (vLLM, llama.cpp, LM Studio), for testing.",
    "oproxy-fake-openai",
)
