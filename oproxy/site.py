"""
The HTTP site: a request class that refuses oversized bodies without holding them.

Twisted buffers a request body before the resource sees it; without a cap a
client could fill the disk or memory with one upload.  A :class:`BoundedRequest`
counts what arrives, stops keeping it past the limit, and lets the app answer
413 once the body is done.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from twisted.web import http, server
from twisted.web.resource import IResource


class BoundedRequest(server.Request):
    """A request whose body is kept only up to ``max_body_bytes``."""

    max_body_bytes: int = 32 * 1024 * 1024
    body_too_large = False
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body_bytes:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


class ProxySite(server.Site):
    """
    A Site whose requests are bounded by the current configuration's limit.
    """

    def __init__(self, resource: IResource, max_body_bytes: Callable[[], int], **kw: Any) -> None:
        super().__init__(resource, **kw)  # type: ignore[no-untyped-call]
        self._max_body_bytes = max_body_bytes
        self.requestFactory = self._make_request  # type: ignore[assignment]

    def _make_request(self, channel: http.HTTPChannel, *args: Any, **kw: Any) -> BoundedRequest:
        request = BoundedRequest(channel, *args, **kw)  # type: ignore[no-untyped-call]
        request.max_body_bytes = self._max_body_bytes()
        return request
