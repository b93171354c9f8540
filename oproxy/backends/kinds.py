"""
The backend kinds a configuration's ``type`` names, and how each is built.

One row per kind, so that adding a kind of server is a module beside
this one and a row here; what the kind can do it declares itself, with
the capability interfaces of :mod:`oproxy.backends.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent

from oproxy.backends.base import IBackend
from oproxy.backends.huggingface import HuggingFaceBackend
from oproxy.backends.llamacpp import LlamaCppBackend
from oproxy.backends.lmstudio import LMStudioBackend
from oproxy.backends.ollama import OllamaBackend
from oproxy.backends.openai import OpenAIBackend
from oproxy.backends.tei import TEIBackend
from oproxy.backends.tgi import TGIBackend
from oproxy.backends.vllm import VLLMBackend
from oproxy.config import BackendConfig
from oproxy.upstream import Upstream

Builder = Callable[[BackendConfig, IAgent, IReactorTime], IBackend]


def _openai_kind(kind: type[OpenAIBackend]) -> Builder:
    def build(config: BackendConfig, agent: IAgent, clock: IReactorTime) -> IBackend:
        return kind(config, agent, clock, api_key=config.api_key)

    return build


def _ollama(config: BackendConfig, agent: IAgent, clock: IReactorTime) -> IBackend:
    return OllamaBackend(Upstream(config, agent, clock))


#: Every ``type`` a backend may have, and its builder.
KINDS: Final[dict[str, Builder]] = {
    "ollama": _ollama,
    "openai": _openai_kind(OpenAIBackend),
    "lmstudio": _openai_kind(LMStudioBackend),
    "llamacpp": _openai_kind(LlamaCppBackend),
    "vllm": _openai_kind(VLLMBackend),
    "tgi": _openai_kind(TGIBackend),
    "tei": _openai_kind(TEIBackend),
    "huggingface": _openai_kind(HuggingFaceBackend),
}


def build_backend(config: BackendConfig, agent: IAgent, clock: IReactorTime) -> IBackend:
    """
    The backend ``config`` describes, over ``agent``.

    :raises ValueError: for a ``type`` no kind has (the configuration's
        schema refuses it first) or a URL the kind cannot use.
    """
    try:
        build = KINDS[config.type]
    except KeyError:
        raise ValueError(f"backend type {config.type!r} is not one of {sorted(KINDS)}") from None
    return build(config, agent, clock)
