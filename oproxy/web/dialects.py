"""
The two ways an error is told to a client: OpenAI's and Ollama's.

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


OPENAI = OpenAIDialect()
OLLAMA = OllamaDialect()


def dialect_for_path(path: bytes) -> Dialect:
    """
    The dialect of an answer given before a route is known (a request the
    site refuses while reading it): Ollama's under ``/api/``.
    """
    return OLLAMA if path.lstrip(b"/").startswith(b"api/") else OPENAI
