"""
``POST /v1/chat/completions`` through the proxy, against the fake Ollama.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest_twisted
from twisted.web.iweb import UNKNOWN_LENGTH

from tests.conftest import Proxy
from tests.httputil import header, post_json, sse_events
from tests.openai_schema import assert_valid, assert_valid_sse

HELLO = [{"role": "user", "content": "Why is the sky blue?"}]

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def native(proxy: Proxy, path: str = "/api/chat") -> dict[str, Any]:
    """The last body the proxy sent to the fake Ollama on ``path``."""
    bodies = [body for seen, body in proxy.fake.stats.requests if seen == path]
    assert bodies, f"nothing was sent to {path}"
    return bodies[-1]


async def chat(proxy: Proxy, **body: Any) -> tuple[Any, Any]:
    body.setdefault("model", "llama3.2")
    body.setdefault("messages", HELLO)
    response, raw = await post_json(proxy.client, proxy.v1("chat/completions"), body)
    if body.get("stream"):
        return response, raw
    return response, orjson.loads(raw)


@pytest_twisted.ensureDeferred
async def test_non_streaming_answer_is_valid_openai(proxy: Proxy) -> None:
    response, body = await chat(proxy)
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    assert_valid("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["message"]["refusal"] is None
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    assert body["model"] == "llama3.2"
    assert isinstance(body["created"], int)
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest_twisted.ensureDeferred
async def test_whole_answers_have_a_length_and_streams_are_chunked(proxy: Proxy) -> None:
    url = proxy.v1("chat/completions")
    messages = [{"role": "user", "content": "hi"}]
    whole, body = await post_json(proxy.client, url, {"model": "llama3.2", "messages": messages})
    assert whole.code == 200 and whole.length == len(body)
    error, error_body = await post_json(proxy.client, url, {"model": "nope", "messages": messages})
    assert error.code == 404 and error.length == len(error_body)
    stream, _ = await post_json(
        proxy.client, url, {"model": "llama3.2", "messages": messages, "stream": True}
    )
    assert stream.code == 200 and stream.length is UNKNOWN_LENGTH


@pytest_twisted.ensureDeferred
async def test_ids_are_unique(proxy: Proxy) -> None:
    ids = set()
    for _ in range(5):
        _, body = await chat(proxy)
        ids.add(body["id"])
    assert len(ids) == 5


@pytest_twisted.ensureDeferred
async def test_streaming_framing_headers_and_content(proxy: Proxy) -> None:
    _, whole = await chat(proxy)
    response, raw = await chat(proxy, stream=True)
    assert response.code == 200
    assert header(response, "content-type").startswith("text/event-stream")
    assert header(response, "cache-control") == "no-cache"
    assert header(response, "x-accel-buffering") == "no"
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest_twisted.ensureDeferred
async def test_stream_include_usage(proxy: Proxy) -> None:
    _, raw = await chat(proxy, stream=True, stream_options={"include_usage": True})
    chunks = sse_events(raw)[:-1]
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest_twisted.ensureDeferred
async def test_sampling_parameters_reach_ollama_options(proxy: Proxy) -> None:
    response, _ = await chat(
        proxy,
        temperature=0.2,
        top_p=0.5,
        seed=42,
        stop=["\n\n", "END"],
        frequency_penalty=0.1,
        presence_penalty=0.3,
        max_completion_tokens=50,
        max_tokens=7,
    )
    assert response.code == 200
    options = native(proxy)["options"]
    assert options["temperature"] == 0.2
    assert options["top_p"] == 0.5
    assert options["seed"] == 42
    assert options["stop"] == ["\n\n", "END"]
    assert options["frequency_penalty"] == 0.1
    assert options["presence_penalty"] == 0.3
    assert options["num_predict"] == 50  # max_completion_tokens wins


@pytest_twisted.ensureDeferred
async def test_max_tokens_and_string_stop(proxy: Proxy) -> None:
    _, body = await chat(proxy, max_tokens=3, stop="END")
    options = native(proxy)["options"]
    assert options["num_predict"] == 3
    assert options["stop"] == ["END"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


@pytest_twisted.ensureDeferred
async def test_unsent_sampling_is_not_forced(proxy: Proxy) -> None:
    await chat(proxy)
    options = native(proxy).get("options") or {}
    assert "temperature" not in options
    assert "top_p" not in options


@pytest_twisted.ensureDeferred
async def test_native_options_pass_through(proxy: Proxy) -> None:
    response, _ = await chat(
        proxy,
        options={"num_ctx": 8192, "keep_alive": "10m", "top_k": 20, "temperature": 0.9},
        temperature=0.1,
    )
    assert response.code == 200
    sent = native(proxy)
    assert sent["options"]["num_ctx"] == 8192
    assert sent["options"]["top_k"] == 20
    assert sent["options"]["temperature"] == 0.1  # the OpenAI field wins
    assert sent["keep_alive"] == "10m"
    assert "keep_alive" not in sent["options"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest_twisted.ensureDeferred
async def test_tool_call_non_streaming(proxy: Proxy) -> None:
    _, body = await chat(proxy, tools=[WEATHER_TOOL])
    assert_valid("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["id"]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(orjson.loads(call["function"]["arguments"]), dict)
    assert native(proxy)["tools"][0]["function"]["name"] == "get_weather"


@pytest_twisted.ensureDeferred
async def test_tool_call_streaming(proxy: Proxy) -> None:
    _, raw = await chat(proxy, tools=[WEATHER_TOOL], stream=True)
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    chunks = sse_events(raw)[:-1]
    calls = [call for c in chunks for call in (c["choices"][0]["delta"].get("tool_calls") or [])]
    assert calls and calls[0]["function"]["name"] == "get_weather"
    assert calls[0]["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest_twisted.ensureDeferred
async def test_tool_result_in_history_reaches_model(proxy: Proxy) -> None:
    messages = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    response, body = await chat(proxy, messages=messages, tools=[WEATHER_TOOL])
    assert response.code == 200, body
    sent = native(proxy)["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert sent[2]["tool_name"] == "get_weather"
    assert sent[2]["tool_call_id"] == "call_1"
    assert "sunny, 21C" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest_twisted.ensureDeferred
async def test_tool_choice_none_is_honoured(proxy: Proxy) -> None:
    _, body = await chat(proxy, tools=[WEATHER_TOOL], tool_choice="none")
    assert "tools" not in native(proxy)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"]


@pytest_twisted.ensureDeferred
async def test_response_format_json_object(proxy: Proxy) -> None:
    _, body = await chat(proxy, response_format={"type": "json_object"})
    assert native(proxy)["format"] == "json"
    assert isinstance(orjson.loads(body["choices"][0]["message"]["content"]), dict)


@pytest_twisted.ensureDeferred
async def test_response_format_json_schema(proxy: Proxy) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    _, body = await chat(
        proxy,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    assert native(proxy)["format"] == schema
    answer = orjson.loads(body["choices"][0]["message"]["content"])
    assert isinstance(answer["name"], str) and isinstance(answer["age"], int)


@pytest_twisted.ensureDeferred
async def test_reasoning_effort_returns_reasoning_content(proxy: Proxy) -> None:
    _, body = await chat(proxy, model="qwen3", reasoning_effort="high")
    assert native(proxy)["think"] == "high"
    message = body["choices"][0]["message"]
    assert message["reasoning_content"]
    assert message["content"]
    _, raw = await chat(proxy, model="qwen3", reasoning_effort="low", stream=True)
    deltas = [c["choices"][0]["delta"] for c in sse_events(raw)[:-1]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas)


@pytest_twisted.ensureDeferred
async def test_reasoning_effort_none_turns_thinking_off(proxy: Proxy) -> None:
    _, body = await chat(proxy, model="qwen3", reasoning_effort="none")
    assert native(proxy)["think"] is False
    assert "reasoning_content" not in body["choices"][0]["message"]


@pytest_twisted.ensureDeferred
async def test_logprobs(proxy: Proxy) -> None:
    _, body = await chat(proxy, logprobs=True, top_logprobs=2)
    assert_valid("CreateChatCompletionResponse", body)
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 2 for t in content)


@pytest_twisted.ensureDeferred
async def test_data_url_image_is_sent_as_bare_base64(proxy: Proxy) -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in"},
                {"type": "text", "text": "this picture?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]
    _, body = await chat(proxy, model="llava", messages=messages)
    (sent,) = native(proxy)["messages"]
    assert sent["images"] == [base64.b64encode(PNG).decode()]
    assert "What is in" in sent["content"] and "this picture?" in sent["content"]
    assert f"{len(PNG)} bytes" in body["choices"][0]["message"]["content"]
