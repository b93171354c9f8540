"""
``/v1/messages`` and ``/v1/messages/count_tokens`` through the proxy, over
the fake Ollama and the fake OpenAI-compatible server: every answer, event
and error parsed into the ``anthropic`` SDK's types; tools, thinking, keys,
limits, the cache, keep-alives and metrics as for chat.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic.types
import orjson
import pydantic
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.server import Site

from oproxy.config import (
    APIKey,
    AuthConfig,
    BackendConfig,
    ImagesConfig,
    StateConfig,
    StreamingConfig,
)
from oproxy.security.keys import hash_key
from oproxy.security.policy import KeyPolicy, Limits
from oproxy.testing import FakeOpenAI
from oproxy.testing.ollama.models import BROKEN_ERROR
from tests.conftest import Proxy, listen
from tests.httputil import header, post_json, typed_sse_events
from tests.test_failures import PNG, ImageServer
from tests.test_metrics import scrape, value

EVENTS = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


async def create(
    proxy: Proxy, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, Any, Any]:
    """POST a message; a stream comes back as its checked events."""
    body = {
        "model": "llama3.2",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        **body,
    }
    body = {name: field for name, field in body.items() if field is not None}
    response, raw = await post_json(
        proxy.client,
        proxy.v1("messages"),
        body,
        {"anthropic-version": "2023-06-01", **(headers or {})},
    )
    if body.get("stream") and response.code == 200:
        events = typed_sse_events(raw)
        for event in events:
            if event["type"] not in ("ping", "error"):
                EVENTS.validate_python(event)
        return response.code, events, response
    parsed = orjson.loads(raw)
    if response.code == 200:
        anthropic.types.Message.model_validate(parsed)
    else:
        anthropic.types.ErrorResponse.model_validate(parsed)
    return response.code, parsed, response


def text_of(message: dict[str, Any]) -> str:
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")


def streamed_text(events: list[dict[str, Any]]) -> str:
    return "".join(
        e["delta"]["text"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    )


def sent(proxy: Proxy) -> dict[str, Any]:
    path, body = proxy.fake.stats.requests[-1]
    assert path == "/api/chat"
    return dict(body)


@pytest_twisted.ensureDeferred
async def test_a_message(proxy: Proxy) -> None:
    code, message, response = await create(proxy, system="Be brief.", top_k=20, temperature=0.3)
    assert code == 200, message
    assert text_of(message) == "You said: Why is the sky blue. This is a fake answer from llama3.2."
    assert message["stop_reason"] == "end_turn" and message["model"] == "llama3.2"
    assert message["usage"]["output_tokens"] > 0 and message["usage"]["input_tokens"] > 0
    assert header(response, "request-id") == header(response, "x-request-id")
    body = sent(proxy)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert body["options"] == {"top_k": 20, "temperature": 0.3, "num_predict": 200}


@pytest_twisted.ensureDeferred
async def test_a_streamed_message(proxy: Proxy) -> None:
    _, whole, _ = await create(proxy)
    code, events, _ = await create(proxy, stream=True)
    assert code == 200
    assert [e["type"] for e in events[:3]] == ["message_start", "ping", "content_block_start"]
    assert [e["type"] for e in events[-3:]] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert streamed_text(events) == text_of(whole)
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert events[-2]["usage"]["output_tokens"] == whole["usage"]["output_tokens"]


@pytest_twisted.ensureDeferred
async def test_max_tokens_cuts_the_answer(proxy: Proxy) -> None:
    code, message, _ = await create(proxy, max_tokens=3)
    assert (code, message["stop_reason"]) == (200, "max_tokens")
    code, events, _ = await create(proxy, max_tokens=3, stream=True)
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"


@pytest_twisted.ensureDeferred
async def test_thinking(proxy: Proxy) -> None:
    thinking = {"type": "enabled", "budget_tokens": 10000}
    code, message, _ = await create(proxy, model="qwen3", thinking=thinking)
    assert code == 200
    assert sent(proxy)["think"] == "medium"
    assert [block["type"] for block in message["content"]] == ["thinking", "text"]
    code, events, _ = await create(proxy, model="qwen3", thinking=thinking, stream=True)
    kinds = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert kinds[0] == "thinking_delta" and kinds[-1] == "text_delta"
    code, _, _ = await create(proxy, model="qwen3", thinking={"type": "disabled"})
    assert sent(proxy)["think"] is False


@pytest_twisted.ensureDeferred
async def test_a_tool_use_round_trip(proxy: Proxy) -> None:
    question = {"role": "user", "content": "Weather in Oslo?"}
    code, first, _ = await create(proxy, messages=[question], tools=[WEATHER])
    assert (code, first["stop_reason"]) == (200, "tool_use")
    (use,) = [block for block in first["content"] if block["type"] == "tool_use"]
    assert use["name"] == "get_weather" and "city" in use["input"]
    answer = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "rain, 12C"}],
    }
    code, final, _ = await create(
        proxy,
        messages=[question, {"role": "assistant", "content": first["content"]}, answer],
        tools=[WEATHER],
    )
    assert code == 200
    assert text_of(final) == "The tool returned: rain, 12C"
    assert sent(proxy)["messages"][-1] == {
        "role": "tool",
        "content": "rain, 12C",
        "tool_name": "get_weather",
        "tool_call_id": use["id"],
    }
    # Streamed: the call's input comes as JSON fragments.
    code, events, _ = await create(proxy, messages=[question], tools=[WEATHER], stream=True)
    (start,) = [e for e in events if e["type"] == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use"
    json = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta")
    assert "city" in orjson.loads(json)
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


@pytest_twisted.ensureDeferred
async def test_tool_choice_none_sends_no_tools(proxy: Proxy) -> None:
    code, message, _ = await create(proxy, tools=[WEATHER], tool_choice={"type": "none"})
    assert (code, message["stop_reason"]) == (200, "end_turn")
    assert "tools" not in sent(proxy)


@pytest_twisted.ensureDeferred
async def test_an_image(proxy: Proxy) -> None:
    png = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
        "RU5ErkJggg=="
    )
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
    content = [image, {"type": "text", "text": "What is it?"}]
    code, _, _ = await create(proxy, model="llava", messages=[{"role": "user", "content": content}])
    assert code == 200
    assert sent(proxy)["messages"][0]["images"] == [png]


# -- errors --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_errors_are_anthropics(proxy: Proxy) -> None:
    code, body, _ = await create(proxy, model="no-such-model")
    assert (code, body["error"]["type"]) == (404, "not_found_error")
    code, body, _ = await create(proxy, max_tokens=None)
    assert (code, body["error"]["type"]) == (400, "invalid_request_error")
    assert "max_tokens" in body["error"]["message"]
    code, body, _ = await create(
        proxy, messages=[{"role": "user", "content": [{"type": "document"}]}]
    )
    assert code == 400
    code, body, _ = await create(proxy, model="crash")
    assert (code, body["error"]["type"]) == (500, "api_error")
    response = await proxy.client.get(proxy.v1("messages"))
    assert response.code == 405
    anthropic.types.ErrorResponse.model_validate_json(await treq.content(response))
    response, raw = await post_json(proxy.client, proxy.v1("messages/batches"), {})
    assert response.code == 404
    assert orjson.loads(raw)["error"]["type"] == "not_found_error"
    response, raw = await post_json(proxy.client, proxy.v1("messages"), [1, 2])
    assert response.code == 400
    anthropic.types.ErrorResponse.model_validate_json(raw)
    assert proxy.fake.stats.started == 0


@pytest_twisted.ensureDeferred
async def test_a_stream_failing_midway_ends_with_an_error_event(proxy: Proxy) -> None:
    code, events, _ = await create(proxy, model="broken", stream=True)
    assert code == 200
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": BROKEN_ERROR}}
    anthropic.types.ErrorResponse.model_validate(events[-1])


@pytest_twisted.ensureDeferred
async def test_a_loading_model_gets_pings(proxy_factory: Any) -> None:
    proxy = proxy_factory(streaming=StreamingConfig(keepalive_after=0.2, keepalive_interval=0.2))
    _, raw = await post_json(
        proxy.client,
        proxy.v1("messages"),
        {
            "model": "cold",
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    events = typed_sse_events(raw)
    assert events[0] == {"type": "ping"}  # before message_start: the model was loading
    assert "message_start" in [e["type"] for e in events]
    assert events[-1] == {"type": "message_stop"}


# -- count_tokens -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_count_tokens_is_an_estimate_asking_no_backend(proxy: Proxy) -> None:
    body = {
        "model": "llama3.2",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "x" * 400}],
        "tools": [WEATHER],
    }
    response, raw = await post_json(proxy.client, proxy.v1("messages/count_tokens"), body)
    assert response.code == 200
    counted = anthropic.types.MessageTokensCount.model_validate_json(raw)
    assert 100 < counted.input_tokens < 200
    assert proxy.fake.stats.requests == []
    response, raw = await post_json(
        proxy.client, proxy.v1("messages/count_tokens"), {"model": "llama3.2", "messages": []}
    )
    assert response.code == 400


# -- keys, limits, the cache, metrics ----------------------------------------------------------


def keyed(name: str, secret: str, **policy: Any) -> APIKey:
    return APIKey(name=name, sha256=hash_key(secret), policy=KeyPolicy(**policy))


@pytest_twisted.ensureDeferred
async def test_keys_and_limits_apply(proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(
            keys=(
                keyed("tight", "sk-tight", limits=Limits(rpm=1)),
                keyed("narrow", "sk-narrow", models=("qwen3",)),
            )
        ),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    code, body, _ = await create(proxy)
    assert (code, body["error"]["type"]) == (401, "authentication_error")
    code, body, response = await create(proxy, {"x-api-key": "sk-tight"})
    assert code == 200
    code, body, response = await create(proxy, {"x-api-key": "sk-tight"})
    assert (code, body["error"]["type"]) == (429, "rate_limit_error")
    assert header(response, "retry-after") is not None
    code, body, _ = await create(proxy, {"x-api-key": "sk-narrow"})
    assert (code, body["error"]["type"]) == (403, "permission_error")
    response, _ = await post_json(
        proxy.client,
        proxy.v1("messages/count_tokens"),
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
        {"x-api-key": "sk-narrow"},
    )
    assert response.code == 403


@pytest_twisted.ensureDeferred
async def test_the_cache_serves_a_deterministic_message_again(proxy: Proxy) -> None:
    _, first, response = await create(proxy, temperature=0)
    assert header(response, "x-cache") == "MISS"
    _, second, response = await create(proxy, temperature=0)
    assert header(response, "x-cache") == "HIT"
    assert text_of(first) == text_of(second) and first["id"] != second["id"]
    assert proxy.fake.stats.started == 1


@pytest_twisted.ensureDeferred
async def test_metrics_name_the_route(proxy: Proxy) -> None:
    await create(proxy)
    await create(proxy, stream=True)
    await create(proxy, model="no-such-model")
    await proxy.settled()
    samples = await scrape(proxy)
    ok = {"model": "llama3.2", "backend": "local", "status": "200"}
    assert value(samples, "oproxy_requests_total", route="/v1/messages", **ok) == 2
    assert (
        value(
            samples,
            "oproxy_requests_total",
            route="/v1/messages",
            model="-",
            backend="-",
            status="404",
        )
        == 1
    )
    assert (
        value(
            samples, "oproxy_time_to_first_token_seconds_count", route="messages", model="llama3.2"
        )
        == 1
    )


# -- over an OpenAI-compatible backend ------------------------------------------------------


@pytest.fixture
def over_openai(proxy_factory: Any) -> Iterator[tuple[Proxy, FakeOpenAI]]:
    fake = FakeOpenAI(reactor, api_key="sk-upstream")
    running = listen(Site(fake.resource()))
    backend = BackendConfig(
        name="vllm", type="openai", url=running.url + "/v1", api_key="sk-upstream"
    )
    yield proxy_factory(backends=(backend,)), fake
    pytest_twisted.blockon(running.port.stopListening())


@pytest_twisted.ensureDeferred
async def test_over_an_openai_compatible_backend(over_openai: tuple[Proxy, FakeOpenAI]) -> None:
    proxy, fake = over_openai
    code, message, response = await create(proxy, model="gpt-fake", top_k=5, system="Be brief.")
    assert code == 200, message
    assert header(response, "x-oproxy-backend") == "vllm"
    assert text_of(message) == "You said: Why is the sky blue. This is a fake answer from gpt-fake."
    upstream = fake.stats.requests[-1].body
    assert upstream["top_k"] == 5 and upstream["max_completion_tokens"] == 200
    assert upstream["messages"][0] == {"role": "system", "content": "Be brief."}
    code, events, _ = await create(proxy, model="gpt-fake", stream=True)
    assert streamed_text(events) == text_of(message)
    code, events, _ = await create(proxy, model="gpt-fake", tools=[WEATHER], stream=True)
    fragments = [
        e["delta"]["partial_json"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"
    ]
    assert len(fragments) > 1 and "city" in orjson.loads("".join(fragments))
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


@pytest_twisted.ensureDeferred
async def test_claude_codes_beta_query_and_headers_are_accepted(proxy: Proxy) -> None:
    response, raw = await post_json(
        proxy.client,
        proxy.v1("messages?beta=true"),
        {"model": "llama3.2", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
        {"anthropic-beta": "interleaved-thinking-2025-05-14", "anthropic-version": "2023-06-01"},
    )
    assert response.code == 200
    anthropic.types.Message.model_validate_json(raw)
    response, raw = await post_json(
        proxy.client,
        proxy.v1("messages/count_tokens?beta=true"),
        {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_url_images_go_through_the_guarded_fetcher(proxy_factory: Any) -> None:
    server = ImageServer(PNG)
    proxy = proxy_factory(images=ImagesConfig(allow_private_networks=True, max_bytes=1024))
    guarded = proxy_factory(images=ImagesConfig())

    def asking(url: str) -> list[dict[str, Any]]:
        image = {"type": "image", "source": {"type": "url", "url": url}}
        return [{"role": "user", "content": [image, {"type": "text", "text": "Describe"}]}]

    try:
        code, _, _ = await create(proxy, model="llava", messages=asking(server.url("cat.png")))
        assert code == 200
        assert sent(proxy)["messages"][0]["images"] == [base64.b64encode(PNG).decode()]
        code, body, _ = await create(proxy, model="llava", messages=asking(server.url("huge.png")))
        assert (code, body["error"]["type"]) == (400, "invalid_request_error")
        # A private address, with the guard on: refused, and nothing is sent upstream.
        code, body, _ = await create(guarded, model="llava", messages=asking(server.url("cat.png")))
        assert code == 400 and "could not be fetched" in body["error"]["message"]
    finally:
        await server.running.port.stopListening()
