"""
``/v1/responses`` through the proxy, over the fake Ollama and the fake
OpenAI-compatible server: answers and streams checked against OpenAI's
schema, stored responses per key, chaining, tools, errors, the cache, the
limits and the metrics applying as for chat.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
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
    ResponsesConfig,
    StateConfig,
)
from oproxy.security.keys import hash_key
from oproxy.security.policy import KeyPolicy, Limits
from oproxy.testing import FakeOpenAI
from oproxy.testing.ollama.models import BROKEN_ERROR
from tests.conftest import Proxy, listen
from tests.httputil import header, post_json, typed_sse_events
from tests.openai_schema import assert_valid
from tests.test_failures import PNG, ImageServer
from tests.test_metrics import scrape, value

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create(
    proxy: Proxy, token: str | None = None, **body: Any
) -> tuple[int, dict[str, Any], Any]:
    body = {"model": "llama3.2", "input": "Why is the sky blue?", **body}
    response, raw = await post_json(
        proxy.client, proxy.v1("responses"), body, bearer(token) if token else None
    )
    if body.get("stream") and response.code == 200:
        assert header(response, "content-type") == "text/event-stream; charset=utf-8"
        return response.code, {}, typed_sse_events(raw)
    return response.code, orjson.loads(raw), response


async def get(proxy: Proxy, path: str, token: str | None = None) -> tuple[int, Any]:
    response = await proxy.client.get(proxy.v1(path), headers=bearer(token) if token else None)
    return response.code, orjson.loads(await treq.content(response))


async def delete(proxy: Proxy, path: str, token: str | None = None) -> tuple[int, Any]:
    response = await proxy.client.delete(proxy.v1(path), headers=bearer(token) if token else None)
    return response.code, orjson.loads(await treq.content(response))


def sent_messages(proxy: Proxy) -> list[dict[str, Any]]:
    """The messages of the last chat the fake Ollama received."""
    path, body = proxy.fake.stats.requests[-1]
    assert path == "/api/chat"
    messages: list[dict[str, Any]] = body["messages"]
    return messages


def text_of(response: dict[str, Any]) -> str:
    return "".join(
        part["text"]
        for item in response["output"]
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


# -- answers and streams -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_response(proxy: Proxy) -> None:
    code, body, response = await create(proxy, instructions="Be brief.", max_output_tokens=50)
    assert code == 200, body
    assert_valid("Response", body)
    assert body["status"] == "completed" and body["store"] is True
    assert text_of(body) == "You said: Why is the sky blue. This is a fake answer from llama3.2."
    assert body["usage"]["output_tokens"] > 0
    assert header(response, "x-oproxy-backend") == "local"
    assert sent_messages(proxy) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    assert proxy.fake.stats.requests[-1][1]["options"] == {"num_predict": 50}


@pytest_twisted.ensureDeferred
async def test_a_streamed_response(proxy: Proxy) -> None:
    _, whole, _ = await create(proxy)
    code, _, events = await create(proxy, stream=True)
    assert code == 200
    for event in events:
        assert_valid("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == text_of(whole) == text_of(events[-1]["response"])
    assert events[-1]["response"]["usage"]["output_tokens"] > 0


@pytest_twisted.ensureDeferred
async def test_reasoning_is_asked_for_and_returned(proxy: Proxy) -> None:
    code, body, _ = await create(proxy, model="qwen3", reasoning={"effort": "high"})
    assert code == 200
    assert proxy.fake.stats.requests[-1][1]["think"] == "high"
    assert [item["type"] for item in body["output"]] == ["reasoning", "message"]
    assert_valid("Response", body)
    code, _, events = await create(proxy, model="qwen3", stream=True)
    assert any(e["type"] == "response.reasoning_text.delta" for e in events)
    for event in events:
        assert_valid("ResponseStreamEvent", event)


@pytest_twisted.ensureDeferred
async def test_json_schema_output(proxy: Proxy) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    code, body, _ = await create(
        proxy, text={"format": {"type": "json_schema", "name": "number", "schema": schema}}
    )
    assert code == 200
    assert proxy.fake.stats.requests[-1][1]["format"] == schema
    assert isinstance(orjson.loads(text_of(body))["n"], int)


@pytest_twisted.ensureDeferred
async def test_a_tool_round_trip(proxy: Proxy) -> None:
    code, first, _ = await create(proxy, input="Weather in Tokyo?", tools=[WEATHER])
    assert code == 200
    assert_valid("Response", first)
    (call,) = first["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert "city" in orjson.loads(call["arguments"])
    # The tool's output, sent back without restating the conversation.
    code, second, _ = await create(
        proxy,
        previous_response_id=first["id"],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "rain, 12C"}],
        tools=[WEATHER],
    )
    assert code == 200, second
    assert text_of(second) == "The tool returned: rain, 12C"
    messages = sent_messages(proxy)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[2]["tool_name"] == "get_weather"


@pytest_twisted.ensureDeferred
async def test_a_streamed_tool_call(proxy: Proxy) -> None:
    code, _, events = await create(proxy, input="Weather?", tools=[WEATHER], stream=True)
    assert code == 200
    for event in events:
        assert_valid("ResponseStreamEvent", event)
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["name"] == "get_weather" and "city" in orjson.loads(done["arguments"])


@pytest_twisted.ensureDeferred
async def test_an_image_reaches_ollama_inline(proxy: Proxy) -> None:
    png = (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
        "RU5ErkJggg=="
    )
    code, body, _ = await create(
        proxy,
        model="llava",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is it?"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{png}"},
                ],
            }
        ],
    )
    assert code == 200, body
    assert sent_messages(proxy)[0]["images"] == [png]


# -- errors ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_errors_are_openais(proxy: Proxy) -> None:
    code, body, _ = await create(proxy, model="no-such-model")
    assert (code, body["error"]["code"]) == (404, "model_not_found")
    assert_valid("ErrorResponse", body)
    code, body, _ = await create(proxy, input=[{"role": "user"}])
    assert (code, body["error"]["param"]) == (400, "input.0.content")
    code, body, _ = await create(proxy, tools=[{"type": "web_search"}])
    assert (code, body["error"]["param"]) == (400, "tools.0.type")
    code, body, _ = await create(proxy, reasoning={"effort": "extreme"})
    assert (code, body["error"]["param"]) == (400, "reasoning.effort")
    assert proxy.fake.stats.started == 0


@pytest_twisted.ensureDeferred
async def test_a_stream_failing_midway_ends_with_error_and_response_failed(proxy: Proxy) -> None:
    code, _, events = await create(proxy, model="broken", stream=True)
    assert code == 200
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["message"] == BROKEN_ERROR
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": BROKEN_ERROR}
    for event in events:
        assert_valid("ResponseStreamEvent", event)


@pytest_twisted.ensureDeferred
async def test_an_upstream_failure_before_the_stream_is_an_http_error(proxy: Proxy) -> None:
    code, body, _ = await create(proxy, model="crash", stream=True)
    assert code == 502
    assert_valid("ErrorResponse", body)


# -- stored responses -------------------------------------------------------------------------

ALICE, BOB = "sk-alice", "sk-bob"


def keyed(name: str, secret: str, **limits: int) -> APIKey:
    return APIKey(name=name, sha256=hash_key(secret), policy=KeyPolicy(limits=Limits(**limits)))


@pytest.fixture
def keyed_proxy(proxy_factory: Any, tmp_path: Path) -> Any:
    def start(**changes: Any) -> Proxy:
        started: Proxy = proxy_factory(
            auth=AuthConfig(keys=(keyed("alice", ALICE), keyed("bob", BOB))),
            state=StateConfig(path=str(tmp_path / "state.db")),
            **changes,
        )
        return started

    return start


@pytest_twisted.ensureDeferred
async def test_a_stored_response_is_its_keys_alone(keyed_proxy: Any) -> None:
    proxy = keyed_proxy()
    code, made, _ = await create(proxy, ALICE, input="My name is Ada.", instructions="Be brief.")
    assert code == 200
    response_id = made["id"]
    code, found = await get(proxy, f"responses/{response_id}", ALICE)
    assert (code, found) == (200, made)
    # Another key sees nothing: not to read, not to continue, not to delete.
    code, body = await get(proxy, f"responses/{response_id}", BOB)
    assert (code, body["error"]["code"]) == (404, "not_found")
    code, body = await get(proxy, f"responses/{response_id}/input_items", BOB)
    assert code == 404
    code, body, _ = await create(proxy, BOB, previous_response_id=response_id, input="And?")
    assert (code, body["error"]["param"]) == (404, "previous_response_id")
    code, body = await delete(proxy, f"responses/{response_id}", BOB)
    assert code == 404
    # The owner continues it: the earlier turns come first, the earlier
    # instructions do not.
    code, chained, _ = await create(
        proxy, ALICE, previous_response_id=response_id, input="What is my name?"
    )
    assert code == 200
    assert chained["previous_response_id"] == response_id
    assert sent_messages(proxy) == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": text_of(made)},
        {"role": "user", "content": "What is my name?"},
    ]
    # A third turn reaches back through both.
    code, _, _ = await create(
        proxy, ALICE, previous_response_id=chained["id"], input="Thanks.", stream=True
    )
    assert code == 200
    assert [m["content"] for m in sent_messages(proxy)] == [
        "My name is Ada.",
        text_of(made),
        "What is my name?",
        text_of(chained),
        "Thanks.",
    ]
    # Deleted, it is gone for its owner too.
    code, body = await delete(proxy, f"responses/{response_id}", ALICE)
    assert (code, body) == (200, {"id": response_id, "object": "response", "deleted": True})
    code, _ = await get(proxy, f"responses/{response_id}", ALICE)
    assert code == 404
    # A response that continued it cannot be rebuilt now.
    code, body, _ = await create(
        proxy, ALICE, previous_response_id=chained["id"], input="Still there?"
    )
    assert (code, body["error"]["code"]) == (400, "previous_response_not_found")


@pytest_twisted.ensureDeferred
async def test_a_streamed_response_is_stored_before_it_is_announced(keyed_proxy: Any) -> None:
    proxy = keyed_proxy()
    code, _, events = await create(proxy, ALICE, stream=True)
    assert code == 200
    final = events[-1]["response"]
    code, found = await get(proxy, f"responses/{final['id']}", ALICE)
    assert (code, found) == (200, final)


@pytest_twisted.ensureDeferred
async def test_input_items_are_listed_a_page_at_a_time(keyed_proxy: Any) -> None:
    proxy = keyed_proxy()
    items = [{"role": "user", "content": f"message {number}"} for number in range(5)]
    code, made, _ = await create(proxy, ALICE, input=items)
    assert code == 200
    path = f"responses/{made['id']}/input_items"
    code, page = await get(proxy, path, ALICE)
    assert code == 200
    assert_valid("ResponseItemList", page)
    texts = [item["content"][0]["text"] for item in page["data"]]
    assert texts == [f"message {number}" for number in reversed(range(5))]  # newest first
    assert page["has_more"] is False
    code, first = await get(proxy, path + "?limit=2&order=asc", ALICE)
    assert [item["content"][0]["text"] for item in first["data"]] == ["message 0", "message 1"]
    assert first["has_more"] is True and first["last_id"] == first["data"][-1]["id"]
    code, second = await get(proxy, f"{path}?limit=2&order=asc&after={first['last_id']}", ALICE)
    assert [item["content"][0]["text"] for item in second["data"]] == ["message 2", "message 3"]
    for bad in ("?limit=0", "?limit=101", "?order=sideways", "?after=msg_nope"):
        code, body = await get(proxy, path + bad, ALICE)
        assert code == 400, bad
        assert_valid("ErrorResponse", body)


@pytest_twisted.ensureDeferred
async def test_store_false_keeps_nothing(keyed_proxy: Any) -> None:
    proxy = keyed_proxy()
    code, made, _ = await create(proxy, ALICE, store=False)
    assert made["store"] is False
    code, _ = await get(proxy, f"responses/{made['id']}", ALICE)
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_the_store_can_be_turned_off_or_bounded(keyed_proxy: Any) -> None:
    proxy = keyed_proxy(responses=ResponsesConfig(store=False))
    code, made, _ = await create(proxy, ALICE)
    assert made["store"] is False
    assert (await get(proxy, f"responses/{made['id']}", ALICE))[0] == 404
    proxy = keyed_proxy(responses=ResponsesConfig(max_bytes=2048))
    code, small, _ = await create(proxy, ALICE)
    assert small["store"] is True
    assert (await get(proxy, f"responses/{small['id']}", ALICE))[0] == 200
    code, large, _ = await create(proxy, ALICE, input="x " * 2000)
    assert (code, large["store"]) == (200, False)
    assert (await get(proxy, f"responses/{large['id']}", ALICE))[0] == 404


@pytest_twisted.ensureDeferred
async def test_an_unknown_response_is_a_404(keyed_proxy: Any) -> None:
    proxy = keyed_proxy()
    for code, body in (
        await get(proxy, "responses/resp_nope", ALICE),
        await delete(proxy, "responses/resp_nope", ALICE),
    ):
        assert code == 404
        assert_valid("ErrorResponse", body)
    code, body = await get(proxy, "responses/resp_nope", None)
    assert code == 401


# -- what applies as for chat -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_limits_apply(keyed_proxy: Any, proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(keys=(keyed("tight", "sk-tight", rpm=1),)),
        state=StateConfig(path=str(tmp_path / "limits.db")),
    )
    code, _, response = await create(proxy, "sk-tight")
    assert code == 200
    assert header(response, "x-ratelimit-limit-requests") == "1"
    code, body, response = await create(proxy, "sk-tight")
    assert code == 429
    assert_valid("ErrorResponse", body)
    assert header(response, "retry-after") is not None


@pytest_twisted.ensureDeferred
async def test_the_cache_serves_a_deterministic_response_again(proxy: Proxy) -> None:
    _, first, response = await create(proxy, temperature=0)
    assert header(response, "x-cache") == "MISS"
    _, second, response = await create(proxy, temperature=0)
    assert header(response, "x-cache") == "HIT"
    assert proxy.fake.stats.started == 1
    assert text_of(first) == text_of(second) and first["id"] != second["id"]
    assert_valid("Response", second)
    # Streams too, replayed as events.
    await create(proxy, temperature=0, stream=True)
    _, _, events = await create(proxy, temperature=0, stream=True)
    assert proxy.fake.stats.started == 2
    assert text_of(events[-1]["response"]) == text_of(first)


@pytest_twisted.ensureDeferred
async def test_metrics_name_the_routes(keyed_proxy: Any) -> None:
    proxy = keyed_proxy()
    _, made, _ = await create(proxy, ALICE)
    await create(proxy, ALICE, stream=True)
    await get(proxy, f"responses/{made['id']}", ALICE)
    await get(proxy, f"responses/{made['id']}/input_items", ALICE)
    await proxy.settled()
    samples = await scrape(proxy)
    ok = {"model": "llama3.2", "backend": "local", "status": "200"}
    assert value(samples, "oproxy_requests_total", route="/v1/responses", **ok) == 2
    for route in ("/v1/responses/{response_id}", "/v1/responses/{response_id}/input_items"):
        assert (
            value(
                samples, "oproxy_requests_total", route=route, model="-", backend="-", status="200"
            )
            == 1
        )
    assert (
        value(
            samples, "oproxy_time_to_first_token_seconds_count", route="responses", model="llama3.2"
        )
        == 1
    )
    assert (
        value(samples, "oproxy_tokens_total", direction="completion", model="llama3.2", key="alice")
        > 0
    )


# -- over an OpenAI-compatible backend ------------------------------------------------------------


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
    code, body, response = await create(proxy, model="gpt-fake", instructions="Be brief.")
    assert code == 200, body
    assert_valid("Response", body)
    assert header(response, "x-oproxy-backend") == "vllm"
    assert text_of(body) == "You said: Why is the sky blue. This is a fake answer from gpt-fake."
    sent = fake.stats.requests[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    code, _, events = await create(proxy, model="gpt-fake", stream=True)
    for event in events:
        assert_valid("ResponseStreamEvent", event)
    assert text_of(events[-1]["response"]) == text_of(body)
    # A tool call streamed in fragments, and answered.
    code, _, events = await create(proxy, model="gpt-fake", tools=[WEATHER], stream=True)
    (done,) = [e for e in events if e["type"] == "response.output_item.done"]
    call = done["item"]
    assert call["type"] == "function_call" and orjson.loads(call["arguments"])
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1
    code, final, _ = await create(
        proxy,
        model="gpt-fake",
        previous_response_id=events[-1]["response"]["id"],
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}],
        tools=[WEATHER],
    )
    assert text_of(final) == "The tool returned: sunny"


@pytest_twisted.ensureDeferred
async def test_url_images_go_through_the_guarded_fetcher(proxy_factory: Any) -> None:
    server = ImageServer(PNG)
    proxy = proxy_factory(images=ImagesConfig(allow_private_networks=True, max_bytes=1024))
    guarded = proxy_factory(images=ImagesConfig())

    def asking(url: str) -> list[dict[str, Any]]:
        image = {"type": "input_image", "image_url": url}
        return [{"role": "user", "content": [{"type": "input_text", "text": "Describe"}, image]}]

    try:
        code, _, _ = await create(proxy, model="llava", input=asking(server.url("cat.png")))
        assert code == 200
        assert sent_messages(proxy)[0]["images"] == [base64.b64encode(PNG).decode()]
        code, body, _ = await create(guarded, model="llava", input=asking(server.url("cat.png")))
        assert code == 400 and "could not be fetched" in body["error"]["message"]
        assert_valid("ErrorResponse", body)
    finally:
        await server.running.port.stopListening()
