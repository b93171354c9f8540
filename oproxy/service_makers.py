"""
The ``twistd`` service makers: the daemon and the fake servers.

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

oproxyFakeLMStudio = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake LM Studio",
    "oproxy.testing.lmstudio.tap",
    "A fake LM Studio server (its OpenAI routes and REST API), for testing.",
    "oproxy-fake-lmstudio",
)

oproxyFakeLlamaCpp = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake llama.cpp server",
    "oproxy.testing.llamacpp.tap",
    "A fake llama.cpp server (llama-server), for testing.",
    "oproxy-fake-llamacpp",
)

oproxyFakeVLLM = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake vLLM",
    "oproxy.testing.vllm.tap",
    "A fake vLLM OpenAI-compatible server, for testing.",
    "oproxy-fake-vllm",
)

oproxyFakeTGI = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake text-generation-inference",
    "oproxy.testing.tgi.tap",
    "A fake Hugging Face text-generation-inference router, for testing.",
    "oproxy-fake-tgi",
)

oproxyFakeTEI = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake text-embeddings-inference",
    "oproxy.testing.tei.tap",
    "A fake Hugging Face text-embeddings-inference router, for testing.",
    "oproxy-fake-tei",
)

oproxyFakeHuggingFace = ServiceMaker(  # type: ignore[no-untyped-call]
    "oproxy fake Hugging Face router",
    "oproxy.testing.huggingface.tap",
    "A fake Hugging Face Inference Providers router, for testing.",
    "oproxy-fake-huggingface",
)
