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


def _fake(package: str, title: str, description: str) -> ServiceMaker:
    """
    The maker of the fake in ``oproxy.testing.<package>``: ``twistd
    oproxy-fake-<package>`` runs its ``tap`` module, so a fake's command and
    module are named once and cannot drift apart.
    """
    return ServiceMaker(  # type: ignore[no-untyped-call]
        f"oproxy fake {title}",
        f"oproxy.testing.{package}.tap",
        description,
        f"oproxy-fake-{package}",
    )


oproxyFakeOllama = _fake(
    "ollama", "Ollama", "A faithful fake Ollama server, for testing clients and oproxy itself."
)

oproxyFakeOpenAI = _fake(
    "openai",
    "OpenAI-compatible server",
    "A fake OpenAI-compatible server (vLLM, llama.cpp, LM Studio), for testing.",
)

oproxyFakeLMStudio = _fake(
    "lmstudio",
    "LM Studio",
    "A fake LM Studio server (its OpenAI routes and REST API), for testing.",
)

oproxyFakeLlamaCpp = _fake(
    "llamacpp", "llama.cpp server", "A fake llama.cpp server (llama-server), for testing."
)

oproxyFakeVLLM = _fake("vllm", "vLLM", "A fake vLLM OpenAI-compatible server, for testing.")

oproxyFakeTGI = _fake(
    "tgi",
    "text-generation-inference",
    "A fake Hugging Face text-generation-inference router, for testing.",
)

oproxyFakeTEI = _fake(
    "tei",
    "text-embeddings-inference",
    "A fake Hugging Face text-embeddings-inference router, for testing.",
)

oproxyFakeHuggingFace = _fake(
    "huggingface",
    "Hugging Face router",
    "A fake Hugging Face Inference Providers router, for testing.",
)
