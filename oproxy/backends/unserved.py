"""
Routes a kind of server does not serve at all: TGI has no embeddings, TEI
no text generation, Hugging Face's router no completions or embeddings.

Such a request is refused before anything is sent, with a 400 that names
the server, rather than passed on to a 404 that would read as a wrong URL.
A kind says what it lacks in its class body, one line a route::

    embeddings = refused("text-generation-inference", "embeddings")
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NoReturn

from oproxy.backends.base import Call
from oproxy.backends.openai import OpenAIBackend
from oproxy.errors import InvalidRequest

#: A route method that only ever refuses: it stands for any route, the
#: streamed ones too, since it never answers.
Refusal = Callable[..., Coroutine[Any, Any, NoReturn]]


def unsupported(backend: str, server: str, what: str, model: str) -> InvalidRequest:
    """The error for a request a server does not serve at all (embeddings from TGI)."""
    return InvalidRequest(
        f"The model {model!r} does not serve {what}: backend {backend!r} is {server}.",
        param="model",
        code="model_not_supported",
    )


def refused(server: str, what: str) -> Refusal:
    """
    The route method of a backend whose ``server`` does not serve ``what``
    (``"chat completions"``...): every call fails with :func:`unsupported`.
    """

    async def refuse(backend: OpenAIBackend, call: Call, body: Mapping[str, Any]) -> NoReturn:
        raise unsupported(backend.name, server, what, call.client_model)

    return refuse
