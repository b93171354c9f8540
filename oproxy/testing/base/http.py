"""
Writing answers, for both fakes: a status, a content type and an explicit
length, as the real servers send small bodies.
"""

from __future__ import annotations

from twisted.web.server import Request


def write(request: Request, data: bytes) -> None:
    """
    ``request.write`` with a type (Twisted leaves it unannotated).
    """
    request.write(data)  # type: ignore[no-untyped-call]


def respond(request: Request, status: int, content_type: bytes | None, body: bytes) -> bytes:
    """
    Set status, content type and an explicit length, and return ``body``
    for Klein to write: the real servers send small bodies with a
    ``Content-Length`` rather than chunked.
    """
    request.setResponseCode(status)
    if content_type is not None:
        request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    return body
