"""
Bad input and upstream failures: always an OpenAI error with the right
status, never a traceback, a hang or a silent truncation.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from oproxy.config import APIKey, AuthConfig, BackendConfig, ImagesConfig, RequestLimits, Timeouts
from oproxy.security.keys import hash_key
from tests.conftest import Proxy, listen
from tests.httputil import header, post_json, raw_post, sse_events
from tests.openai_schema import assert_valid

HELLO = [{"role": "user", "content": "hi"}]


def error_of(raw: bytes) -> dict[str, Any]:
    body = orjson.loads(raw)
    assert_valid("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition never became true")


@pytest_twisted.ensureDeferred
async def test_malformed_json(proxy: Proxy) -> None:
    response = await proxy.client.post(
        proxy.v1("chat/completions"),
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.code == 400
    error = error_of(await treq.content(response))
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


@pytest_twisted.ensureDeferred
async def test_empty_body(proxy: Proxy) -> None:
    response = await proxy.client.post(proxy.v1("chat/completions"), data=b"")
    assert response.code == 400
    error_of(await treq.content(response))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": 5, "messages": HELLO}, "model"),
        ({"model": "llama3.2"}, "messages"),
        ({"model": "llama3.2", "messages": "hi"}, "messages"),
        ({"model": "llama3.2", "messages": [{"content": "x"}]}, "messages.0.role"),
        ({"model": "llama3.2", "messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"model": "llama3.2", "messages": HELLO, "stream": "yes"}, "stream"),
        ({"model": "llama3.2", "messages": HELLO, "stop": [1]}, "stop"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_fields_name_their_param(proxy: Proxy, body: Any, param: str) -> None:
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 400, raw
    error = error_of(raw)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("route", ["chat/completions", "completions", "embeddings"])
@pytest_twisted.ensureDeferred
async def test_unknown_model_is_404_model_not_found(proxy: Proxy, route: str) -> None:
    body = {"model": "no-such-model", "messages": HELLO, "prompt": "x", "input": "x"}
    response, raw = await post_json(proxy.client, proxy.v1(route), body)
    assert response.code == 404
    error = error_of(raw)
    assert error["code"] == "model_not_found"
    assert "no-such-model" in error["message"]


@pytest_twisted.ensureDeferred
async def test_body_too_large(proxy_factory: Any) -> None:
    proxy = proxy_factory(limits=RequestLimits(max_body_bytes=1024))
    big = {"model": "llama3.2", "messages": [{"role": "user", "content": "x" * 5000}]}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), big)
    assert response.code == 413
    assert "1024" in error_of(raw)["message"]
    small = {"model": "llama3.2", "messages": HELLO}
    response, _ = await post_json(proxy.client, proxy.v1("chat/completions"), small)
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_default_body_cap_is_32_mib(proxy: Proxy) -> None:
    assert proxy.app.config.limits.max_body_bytes == 32 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_unreachable_backend_is_502(proxy_factory: Any) -> None:
    dead = listen(Site(Resource()))
    url = dead.url
    await dead.port.stopListening()
    proxy = proxy_factory(backends=(BackendConfig(name="gone", type="ollama", url=url),))
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": "llama3.2", "messages": HELLO}
    )
    assert response.code == 502
    error = error_of(raw)
    assert error["code"] == "upstream_unavailable"
    assert "gone" in error["message"]


@pytest_twisted.ensureDeferred
async def test_first_byte_timeout_is_504_and_closes_upstream(proxy_factory: Any) -> None:
    proxy = proxy_factory(timeouts=Timeouts(connect=5, first_byte=0.3, between_chunks=5))
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": "stall", "messages": HELLO}
    )
    assert response.code == 504
    assert error_of(raw)["code"] == "upstream_timeout"
    await wait_until(lambda: proxy.fake.stats.aborted == 1)


@pytest_twisted.ensureDeferred
async def test_crash_before_first_byte_is_an_http_error(proxy: Proxy) -> None:
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "crash", "messages": HELLO, "stream": True},
    )
    assert response.code == 502
    assert header(response, "content-type") == "application/json"
    assert "runner" in error_of(raw)["message"]


@pytest_twisted.ensureDeferred
async def test_error_after_stream_began_is_an_sse_error_event(proxy: Proxy) -> None:
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "broken", "messages": HELLO, "stream": True},
    )
    assert response.code == 200
    events = sse_events(raw)
    assert "[DONE]" not in events
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    last = events[-1]
    assert set(last) == {"error"}
    assert last["error"]["message"]
    assert_valid("ErrorResponse", last)


@pytest_twisted.ensureDeferred
async def test_broken_non_streaming_is_an_http_error(proxy: Proxy) -> None:
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": "broken", "messages": HELLO}
    )
    assert response.code == 502
    error_of(raw)


@pytest_twisted.ensureDeferred
async def test_queue_full_is_503(proxy: Proxy) -> None:
    proxy.fake.fail_next(503, "server busy, please try again.  maximum pending requests exceeded")
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": "llama3.2", "messages": HELLO}
    )
    assert response.code == 503
    assert "busy" in error_of(raw)["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_client_disconnect_aborts_generation(proxy: Proxy, stream: bool) -> None:
    body = {"model": "slow", "messages": HELLO, "stream": stream}
    client = await raw_post(proxy.url, "/v1/chat/completions", body)
    if stream:
        await wait_until(lambda: client.received.count(b"data: ") >= 2)
    else:
        await wait_until(lambda: proxy.fake.stats.in_flight == 1)
    client.transport.loseConnection()
    await wait_until(lambda: proxy.fake.stats.aborted == 1)
    assert proxy.fake.stats.completed == 0
    assert proxy.fake.stats.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_stall_between_chunks_is_reported_in_the_stream(proxy_factory: Any) -> None:
    proxy = proxy_factory(timeouts=Timeouts(connect=5, first_byte=5, between_chunks=0.01))
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "slow", "messages": HELLO, "stream": True},
    )
    assert response.code == 200
    events = sse_events(raw)
    assert events[-1]["error"]["code"] == "upstream_timeout"
    await wait_until(lambda: proxy.fake.stats.aborted == 1)


@pytest_twisted.ensureDeferred
async def test_unknown_route_is_json_404(proxy: Proxy) -> None:
    response = await proxy.client.get(proxy.v1("nothing/here"))
    assert response.code == 404
    assert header(response, "content-type") == "application/json"
    assert header(response, "x-request-id")
    error_of(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_json_405(proxy: Proxy) -> None:
    response = await proxy.client.get(proxy.v1("chat/completions"))
    assert response.code == 405
    assert "POST" in header(response, "allow")
    error_of(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_request_id_echoed_or_created(proxy: Proxy) -> None:
    body = {"model": "llama3.2", "messages": HELLO}
    response, _ = await post_json(
        proxy.client, proxy.v1("chat/completions"), body, {"X-Request-Id": "trace-123"}
    )
    assert header(response, "x-request-id") == "trace-123"
    response, _ = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    first = header(response, "x-request-id")
    response, _ = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert first and first.startswith("req_") and first != header(response, "x-request-id")


@pytest_twisted.ensureDeferred
async def test_errors_carry_request_id(proxy: Proxy) -> None:
    response, _ = await post_json(proxy.client, proxy.v1("chat/completions"), {"model": 1})
    assert response.code == 400
    assert header(response, "x-request-id")


@pytest_twisted.ensureDeferred
async def test_keys_required_when_configured(proxy_factory: Any) -> None:
    auth = AuthConfig(keys=(APIKey(name="alice", sha256=hash_key("sk-alice")),))
    proxy = proxy_factory(auth=auth)
    body = {"model": "llama3.2", "messages": HELLO}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 401
    assert error_of(raw)["code"] == "invalid_api_key"
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), body, {"Authorization": "Bearer sk-wrong"}
    )
    assert response.code == 401
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), body, {"Authorization": "Bearer sk-alice"}
    )
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_upstream_host_header_is_local(proxy_factory: Any) -> None:
    proxy = proxy_factory()
    proxy.fake.host_check = True
    body = {"model": "llama3.2", "messages": HELLO}
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), body, {"Host": "gateway.example.com"}
    )
    assert response.code == 200, raw


class ImageServer:
    """A tiny web server with one PNG and one over-sized file."""

    def __init__(self, png: bytes) -> None:
        root = Resource()
        root.putChild(b"cat.png", Data(png, "image/png"))
        root.putChild(b"huge.png", Data(b"\x89PNG" + b"0" * 4096, "image/png"))
        root.putChild(b"page.html", Data(b"<html></html>", "text/html"))
        self.running = listen(Site(root))

    def url(self, name: str) -> str:
        return f"{self.running.url}/{name}"


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def image_message(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


@pytest_twisted.ensureDeferred
async def test_http_image_urls_are_fetched(proxy_factory: Any) -> None:
    server = ImageServer(PNG)
    proxy = proxy_factory(images=ImagesConfig(allow_private_networks=True, max_bytes=1024))
    try:
        body = {"model": "llava", "messages": image_message(server.url("cat.png"))}
        response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
        assert response.code == 200, raw
        sent = [b for p, b in proxy.fake.stats.requests if p == "/api/chat"][-1]
        assert sent["messages"][0]["images"] == [base64.b64encode(PNG).decode()]
        # One answer whatever went wrong, so that it tells nothing about
        # what lives at an address (tests/test_images.py has the rest).
        for name in ["huge.png", "page.html", "missing.png"]:
            body = {"model": "llava", "messages": image_message(server.url(name))}
            response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
            assert response.code == 400, name
            assert "could not be fetched" in error_of(raw)["message"]
    finally:
        await server.running.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_private_image_urls_refused_by_default(proxy_factory: Any) -> None:
    proxy = proxy_factory(images=ImagesConfig())
    body = {"model": "llava", "messages": image_message("http://127.0.0.1:1/cat.png")}
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    assert response.code == 400
    assert "could not be fetched" in error_of(raw)["message"]


@pytest_twisted.ensureDeferred
async def test_no_traceback_on_unexpected_error(proxy: Proxy) -> None:
    async def explode(*args: Any) -> Any:
        raise RuntimeError("secret internals")

    proxy.app.router.backends[0].chat_completion = explode  # type: ignore[method-assign]
    response, raw = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": "llama3.2", "messages": HELLO}
    )
    assert response.code == 500
    error = error_of(raw)
    assert error["type"] == "server_error"
    assert b"secret internals" not in raw and b"Traceback" not in raw


@pytest_twisted.ensureDeferred
async def test_host_header_setting_is_sent_upstream(proxy_factory: Any) -> None:
    body = {"model": "llama3.2", "messages": HELLO}
    refused = proxy_factory(host_header="gateway.example.com")
    refused.fake.host_check = True
    response, raw = await post_json(refused.client, refused.v1("chat/completions"), body)
    assert response.code == 502
    assert "host_header" in error_of(raw)["message"]
    local = proxy_factory(host_header="localhost:11434")
    response, raw = await post_json(local.client, local.v1("chat/completions"), body)
    assert response.code == 200, raw
