"""
Small helpers for talking to the proxy in tests.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.iweb import IResponse


async def post_json(
    client: treq.client.HTTPClient, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[IResponse, bytes]:
    response = await client.post(
        url,
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return response, await treq.content(response)


def sse_events(raw: bytes) -> list[Any]:
    """
    Split an event stream into decoded ``data:`` payloads (``"[DONE]"`` kept as a string).

    Asserts the framing is exactly OpenAI's: ``data: <json>`` and a blank line.
    """
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-80:]
    events: list[Any] = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def header(response: IResponse, name: str) -> str | None:
    values = response.headers.getRawHeaders(name.encode("latin-1"))
    return values[0].decode("latin-1") if values else None


class RawClient(Protocol):
    """
    A bare TCP client that sends one request and can hang up mid-answer,
    which is what a user closing a tab or killing a script looks like.
    """

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


async def raw_post(
    url: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> RawClient:
    parts = urlsplit(url)
    endpoint = TCP4ClientEndpoint(reactor, parts.hostname, parts.port)
    client = RawClient()
    await connectProtocol(endpoint, client)
    payload = orjson.dumps(body)
    extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in (headers or {}).items())
    client.transport.write(
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: test\r\n"
        + extra
        + b"Content-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )
    return client


def typed_sse_events(raw: bytes) -> list[dict[str, Any]]:
    """
    Split a stream of named events (OpenAI's Responses API, Anthropic's
    Messages API) into their decoded ``data:``, asserting each is framed as
    ``event: <its type>`` then ``data: <json>`` and a blank line, with no
    ``[DONE]``.
    """
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), text[-80:]
    events: list[dict[str, Any]] = []
    for block in text[:-2].split("\n\n"):
        if block.startswith(":"):
            continue  # a keep-alive comment
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        event = orjson.loads(data[len("data: ") :])
        assert event["type"] == name[len("event: ") :], block
        events.append(event)
    return events
