"""
Error reporting: an unhandled error reaches a Sentry-compatible server as an
envelope with the request's tags, and without prompts or keys.
"""

from __future__ import annotations

import gzip
import json
import secrets
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import sentry_sdk
from twisted.internet import threads
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from oproxy import __version__
from oproxy.config import APIKey, AuthConfig, SentryConfig
from oproxy.reporting import start_reporting, stop_reporting
from oproxy.security.keys import hash_key
from tests.conftest import listen
from tests.httputil import post_json


class EnvelopeReceiver(Resource):
    """Collects what the SDK posts, as a Sentry server would receive it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read()
        encoding = (request.getHeader(b"content-encoding") or b"").lower()
        if encoding == b"gzip":
            body = gzip.decompress(body)
        elif encoding == b"deflate":
            body = zlib.decompress(body)
        elif encoding == b"br":
            import brotli  # type: ignore[import-not-found]

            body = brotli.decompress(body)
        self.envelopes.append(body)
        return b"{}"


def events(envelopes: list[bytes]) -> list[dict[str, Any]]:
    """The ``event`` items of the envelopes."""
    found = []
    for envelope in envelopes:
        lines = envelope.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            if json.loads(header).get("type") == "event":
                found.append(json.loads(payload))
    return found


@pytest.fixture
def receiver() -> Iterator[tuple[EnvelopeReceiver, str]]:
    resource = EnvelopeReceiver()
    running = listen(Site(resource))
    port = running.url.rsplit(":", 1)[1]
    yield resource, f"http://public@127.0.0.1:{port}/42"
    pytest_twisted.blockon(running.port.stopListening())


@pytest_twisted.ensureDeferred
async def test_unhandled_error_is_reported_with_tags_and_nothing_private(
    proxy_factory: Any, receiver: tuple[EnvelopeReceiver, str]
) -> None:
    resource, dsn = receiver
    # Made at run time: source context of a frame must not be what passes.
    key, prompt = f"sk-{secrets.token_hex(8)}", f"prompt-{secrets.token_hex(8)}"
    proxy = proxy_factory(auth=AuthConfig(keys=(APIKey("alice", hash_key(key)),)))

    async def explode(*args: Any) -> Any:
        prompt_in_a_local = args  # noqa: F841 - would show if locals were sent
        raise RuntimeError("backend adapter bug")

    proxy.app.router.backends[0].chat_completion = explode  # type: ignore[method-assign]
    observer = start_reporting(SentryConfig(dsn=dsn, environment="testing"))
    try:
        response, _ = await post_json(
            proxy.client,
            proxy.v1("chat/completions"),
            {"model": "llama3.2", "messages": [{"role": "user", "content": prompt}]},
            {"Authorization": f"Bearer {key}", "X-Request-Id": "trace-sentry"},
        )
        assert response.code == 500
        await threads.deferToThread(sentry_sdk.flush, 10)
    finally:
        stop_reporting(observer)
        sentry_sdk.get_client().close()
    (event,) = events(resource.envelopes)
    exception = event["exception"]["values"][-1]
    assert exception["type"] == "RuntimeError"
    assert exception["value"] == "backend adapter bug"
    assert event["tags"]["request_id"] == "trace-sentry"
    assert event["tags"]["route"] == "/v1/chat/completions"
    assert event["tags"]["model"] == "llama3.2"
    assert event["tags"]["backend"] == "local"
    assert event["environment"] == "testing"
    assert event["release"] == f"oproxy@{__version__}"
    everything = b"".join(resource.envelopes)
    assert prompt.encode() not in everything
    assert key.encode() not in everything


def test_no_dsn_means_no_reporting() -> None:
    assert start_reporting(SentryConfig()) is None


@pytest_twisted.ensureDeferred
async def test_errors_outside_requests_are_reported(
    receiver: tuple[EnvelopeReceiver, str],
) -> None:
    resource, dsn = receiver
    observer = start_reporting(SentryConfig(dsn=dsn))
    try:
        try:
            raise ZeroDivisionError("in a timer")
        except ZeroDivisionError:
            Logger(namespace="oproxy.somewhere").failure("Unhandled error in a timer")
        await threads.deferToThread(sentry_sdk.flush, 10)
    finally:
        stop_reporting(observer)
        sentry_sdk.get_client().close()
    (event,) = events(resource.envelopes)
    assert event["exception"]["values"][-1]["type"] == "ZeroDivisionError"
    assert event["tags"]["logger"] == "oproxy.somewhere"
