"""
``/v1/embeddings`` ⇄ Ollama ``/api/embed``.

The detail that matters most is ``encoding_format``: the official SDK asks
for ``base64`` whenever the caller did not choose, and decodes the string as
little-endian float32.  Returning floats still "works", but any other byte
layout decodes silently to garbage vectors of the wrong length.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any, Final

from oproxy.errors import UpstreamError
from oproxy.translate.common import (
    invalid_value,
    native_extras,
    optional_boolean,
    optional_integer,
    raise_for_upstream_error,
    require_object_body,
    set_given,
    text_inputs,
    token_count,
)

MAX_INPUTS: Final = 2048
"""OpenAI's limit on the number of inputs in one request."""

_ENCODING_FORMATS: Final = frozenset({"float", "base64"})

#: Why inputs of token ids are refused, and what to send instead.
_TEXT_INPUTS_ONLY: Final = (
    "Token arrays are not supported for 'input' by this server: send a string or a "
    "list of strings. (LangChain's OpenAIEmbeddings sends tokens unless "
    "check_embedding_ctx_length=False.)"
)


# ==========================================================================
# Request


def embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    """
    The texts to embed: one string, or 1 to 2048 strings.

    An empty string is allowed (Ollama embeds it); token arrays are refused
    with an explanation, since Ollama cannot take tokens.
    """
    return text_inputs(body, "input", tokens_refused=_TEXT_INPUTS_ONLY, most=MAX_INPUTS)


def encoding_format(body: Mapping[str, Any]) -> str:
    """
    ``float`` (the default) or ``base64``, matched without regard to case as
    Ollama does; anything else is refused with OpenAI's own message.
    """
    value = body.get("encoding_format")
    if value is None or value == "":
        return "float"
    if isinstance(value, str) and value.lower() in _ENCODING_FORMATS:
        return value.lower()
    shown = value if isinstance(value, str) else repr(value)
    raise invalid_value(
        "encoding_format",
        f"Invalid value for 'encoding_format' = {shown}. Supported values: ['float', 'base64'].",
    )


def embeddings_request_to_ollama(
    body: Mapping[str, Any], *, model: str, inputs: list[str]
) -> dict[str, Any]:
    """
    The native ``/api/embed`` body.

    ``dimensions`` asks Ollama to cut and re-normalise the vectors;
    ``truncate``, ``keep_alive`` and ``options`` are Ollama extras a client
    can send through ``extra_body``.

    :raises InvalidRequest: naming the first bad field.
    """
    body = require_object_body(body)
    native: dict[str, Any] = {"model": model, "input": list(inputs)}
    set_given(native, "dimensions", optional_integer(body, "dimensions", "dimensions", minimum=1))
    set_given(native, "truncate", optional_boolean(body, "truncate", "truncate"))
    options, top_level = native_extras(body)
    if options:
        native["options"] = options
    native.update(top_level)
    return native


# ==========================================================================
# Response


def float32_base64(vector: list[float]) -> str:
    """
    ``vector`` as standard base64 of little-endian float32 bytes, the layout
    the SDK decodes with ``array("f")`` / ``np.frombuffer(dtype="float32")``.

    :raises UpstreamError: if a value does not fit a float32.
    """
    try:
        packed = struct.pack(f"<{len(vector)}f", *vector)
    except (struct.error, OverflowError):
        raise UpstreamError("The upstream returned an embedding value out of range.") from None
    return base64.b64encode(packed).decode("ascii")


_NUMBER_TYPES = frozenset((float, int))


def _vector(value: object) -> list[float]:
    """
    One native embedding, checked to be a list of numbers (not booleans).

    The check runs in C (``set(map(type, ...))``): vectors have hundreds or
    thousands of values, and a Python-level loop over them showed in the
    profile.
    """
    if isinstance(value, list) and set(map(type, value)) <= _NUMBER_TYPES:
        return value
    raise UpstreamError("The upstream returned a malformed embedding.")


def ollama_embed_to_openai(
    native: Mapping[str, Any], *, model: str, encoding_format: str
) -> dict[str, Any]:
    """
    An OpenAI embeddings ``list`` from a native ``/api/embed`` response.

    :raises UpstreamError: for an ``{"error": ...}`` body or a response with
        no usable ``embeddings``; an empty ``data`` would only make the SDK
        fail later with a less helpful message.
    """
    raise_for_upstream_error(native)
    embeddings = native.get("embeddings")
    if not isinstance(embeddings, list) or not embeddings:
        raise UpstreamError("The upstream returned no embeddings.")
    as_base64 = encoding_format == "base64"
    data = []
    for index, value in enumerate(embeddings):
        vector = _vector(value)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": float32_base64(vector) if as_base64 else vector,
            }
        )
    tokens = token_count(native.get("prompt_eval_count"))
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
