"""
Small helpers for talking to the proxy in tests.
"""

from __future__ import annotations

from typing import Any

import orjson
import treq
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
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None
