"""
Register ``twistd oproxy`` and ``twistd oproxy-fake-ollama``.

This module is imported by every ``twistd`` invocation that scans plugins, so
it imports nothing heavy: the service makers name their modules by string.
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
    "oproxy.testing.fake_ollama_tap",
    "A faithful fake Ollama server, for testing clients and oproxy itself.",
    "oproxy-fake-ollama",
)

oproxyFakeOpenAI = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake OpenAI-compatible server",
    "oproxy.testing.fake_openai_tap",
    "A fake OpenAI-compatible server (vLLM, llama.cpp, LM Studio), for testing.",
    "oproxy-fake-openai",
)
