"""
The ways an error is told to a client: OpenAI's, Ollama's and Anthropic's.

Every error answer goes through one of these: a handler's failure (see
:mod:`oproxy.web.pipeline`), a route or method that does not exist, a
refused scraper, a request the site refuses before it is read (``408``,
``413``), and a failure after a stream began (an SSE error event, or the
last NDJSON line of an Ollama stream).  The status, ``type`` and ``code``
come from the typed exception (:mod:`oproxy.errors`); a dialect decides
only how they are written.
"""

from __future__ import annotations

import orjson
from twisted.web.iweb import IRequest

from oproxy.errors import Answered, ModelNotFound, OProxyError


class Dialect:
    """How one API family writes its errors."""

    #: The API family, as plugins are told it (the shapes of its bodies).
    name: str = ""
    #: The ``Content-Type`` of an error answer.
    content_type: bytes = b"application/json"
    #: Whether the family's clients send their key as ``x-api-key``
    #: (Anthropic's SDKs and Claude Code do) rather than ``Authorization``.
    reads_x_api_key: bool = False

    def status_and_body(self, error: OProxyError) -> tuple[int, bytes]:
        """The status and the body of a whole error answer."""
        raise NotImplementedError

    def stream_event(self, error: OProxyError) -> bytes:
        """``error`` inside a stream that has begun: its last event."""
        raise NotImplementedError

    def respond(self, request: IRequest, error: OProxyError) -> bytes:
        """
        Set the status and headers of ``error`` on ``request``, and return
        its body.  Headers the error carries (``Retry-After``, the limit
        headers) go out with it.
        """
        status, body = self.status_and_body(error)
        request.setResponseCode(status)
        request.setHeader(b"content-type", self.content_type)
        for name, value in error.headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return body


class OpenAIDialect(Dialect):
    """
    OpenAI's ``{"error": {"message", "type", "param", "code"}}``, all four
    keys always present; in a stream, one SSE event with that object, which
    the official SDK raises as ``APIError``.
    """

    name = "openai"

    def status_and_body(self, error: OProxyError) -> tuple[int, bytes]:
        return error.status, orjson.dumps(error.to_body())

    def stream_event(self, error: OProxyError) -> bytes:
        return b"data: " + orjson.dumps(error.to_body()) + b"\n\n"


class OllamaDialect(Dialect):
    """
    Ollama's ``{"error": "..."}``: its clients read nothing else (the
    ``ollama`` library raises ``ResponseError`` with that message).  An
    error answer from an Ollama backend keeps its own status and message,
    as if the client had asked Ollama; a stream that fails ends with an
    ``{"error": ...}`` line, as Ollama ends one.
    """

    name = "ollama"

    #: What Ollama (gin) labels its JSON answers and errors with.
    content_type = b"application/json; charset=utf-8"

    def status_and_body(self, error: OProxyError) -> tuple[int, bytes]:
        status, message = native_message(error)
        return status, orjson.dumps({"error": message})

    def stream_event(self, error: OProxyError) -> bytes:
        return orjson.dumps({"error": native_message(error)[1]}) + b"\n"


def native_message(error: OProxyError) -> tuple[int, str]:
    """The status and message Ollama would have answered ``error`` with."""
    if isinstance(error, Answered):
        return error.answered_status, error.answered_message
    if isinstance(error, ModelNotFound):
        return error.status, f"model '{error.model}' not found"
    return error.status, error.message


class AnthropicDialect(Dialect):
    """
    Anthropic's ``{"type": "error", "error": {"type", "message"}}``, with
    the statuses its API uses, which its SDKs turn into their exception
    classes (``AuthenticationError``, ``RateLimitError``,
    ``OverloadedError``...); in a stream, an ``event: error`` with that
    object, which the SDKs raise.

    The status is what Anthropic's API would answer for the same failure:
    an overloaded backend (503 here) is its ``529 overloaded_error``, a
    backend that failed (502) its ``500 api_error``.
    """

    reads_x_api_key = True

    def respond(self, request: IRequest, error: OProxyError) -> bytes:
        """As every dialect does, with the request's id where Anthropic's SDKs read it."""
        request_id = getattr(request, "oproxy_request_id", None)
        if isinstance(request_id, str):
            request.setHeader(b"request-id", request_id.encode("ascii"))
        return super().respond(request, error)

    def status_and_body(self, error: OProxyError) -> tuple[int, bytes]:
        status, kind = anthropic_status_and_type(error)
        return status, orjson.dumps(
            {"type": "error", "error": {"type": kind, "message": error.message}}
        )

    def stream_event(self, error: OProxyError) -> bytes:
        _, kind = anthropic_status_and_type(error)
        body = {"type": "error", "error": {"type": kind, "message": error.message}}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


#: Anthropic's error ``type`` for each status it answers with.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

#: Our statuses that Anthropic's API spells another way.
_ANTHROPIC_STATUSES = {502: 500, 503: 529}


def anthropic_status_and_type(error: OProxyError) -> tuple[int, str]:
    """
    The status and error ``type`` Anthropic's API would answer ``error`` with.

    Statuses it has no type of its own for (405, 408, 413, 415) keep
    their number, as ``invalid_request_error``: the request was at fault.
    """
    status = _ANTHROPIC_STATUSES.get(error.status, error.status)
    kind = ANTHROPIC_ERROR_TYPES.get(status)
    if kind is None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
    return status, kind


OPENAI = OpenAIDialect()
OLLAMA = OllamaDialect()
ANTHROPIC = AnthropicDialect()

#: Where Anthropic's Messages API lives.
ANTHROPIC_PREFIX = b"v1/messages"


def dialect_for_path(path: bytes) -> Dialect:
    """
    The dialect of an answer given before a route is known (a request the
    site refuses while reading it, a path or method no route takes):
    Ollama's under ``/api/``, Anthropic's under ``/v1/messages``.
    """
    bare = path.split(b"?", 1)[0].lstrip(b"/")
    if bare.startswith(b"api/"):
        return OLLAMA
    if bare == ANTHROPIC_PREFIX or bare.startswith(ANTHROPIC_PREFIX + b"/"):
        return ANTHROPIC
    return OPENAI
