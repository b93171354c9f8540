"""
How the fake OpenAI server puts answers on the wire (JSON and event-stream
framing) and what it keeps of them (:class:`FakeOpenAIStats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
from twisted.web.server import Request

from oproxy.testing.base.http import respond, write
from oproxy.testing.base.stats import ServerStats
from oproxy.testing.openai.requests import APIError

JSON_TYPE: Final = b"application/json"
SSE_TYPE: Final = b"text/event-stream; charset=utf-8"
DONE: Final = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------
# Framing


def json_response(request: Request, status: int, value: Any) -> bytes:
    """A JSON answer with an explicit length."""
    return respond(request, status, JSON_TYPE, orjson.dumps(value))


def error_response(request: Request, error: APIError) -> bytes:
    """OpenAI's error object, with the error's headers (``retry-after``)."""
    for name, value in error.headers.items():
        request.responseHeaders.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
    return json_response(request, error.status, error.body())


def start_events(request: Request) -> None:
    """Prepare a 200 event stream; the headers leave with the first event."""
    request.setResponseCode(200)
    request.responseHeaders.setRawHeaders(b"content-type", [SSE_TYPE])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-cache"])


def event(value: Any) -> bytes:
    """One ``data:`` event: OpenAI sends no ``event:`` or ``id:`` lines."""
    return b"data: " + orjson.dumps(value) + b"\n\n"


def write_events(request: Request, values: Sequence[Any]) -> None:
    """Write each value as its own event, one ``write`` each."""
    for value in values:
        write(request, event(value))


# --------------------------------------------------------------------------
# What the fake has seen


@dataclass(frozen=True)
class SeenRequest:
    """
    One request as it arrived: what a proxy actually sent upstream.

    :ivar headers: lower-case names, several values joined with ``, ``.
    :ivar body: the decoded JSON body, or ``None``.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @classmethod
    def arrived(cls, request: Request, path: str) -> SeenRequest:
        """
        What ``request`` brought, leaving its body to be read again.
        """
        raw = request.content.read() if request.content is not None else b""
        if request.content is not None:
            request.content.seek(0)
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        headers = {
            name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        method = request.method.decode("latin-1")
        return cls(method=method, path=path, headers=headers, body=body)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "body": self.body,
        }


@dataclass
class FakeOpenAIStats(ServerStats[SeenRequest]):
    """
    Counters and the request log, for tests to assert on (see
    :class:`~oproxy.testing.base.stats.ServerStats`): ``requests`` holds
    every request but the fake's own ``/_fake/*``, ``failed`` the
    generations that ended in an error (``broken``).

    :ivar aborted_streams: the aborted generations that were streams.
    """

    aborted_streams: int = 0

    @property
    def last_request(self) -> SeenRequest | None:
        return self.requests[-1] if self.requests else None

    def counters(self) -> dict[str, Any]:
        """What ``GET /_fake/stats`` serves."""
        last = self.last_request
        return {
            **super().counters(),
            "aborted_streams": self.aborted_streams,
            "last_request": last.to_json() if last is not None else None,
        }

    def reset(self, in_flight: int = 0) -> None:
        """Zero everything, counting generations still running as started."""
        super().reset(in_flight)
        self.aborted_streams = 0
