"""
Every backend kind (LM Studio, llama.cpp, vLLM, TGI, TEI, Hugging Face's
router) runs the suite the Ollama backend runs, through the proxy and
against its fake on loopback: chat, streams, tools, embeddings where the
server has them, errors, and cancellation that reaches the server.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import pytest_twisted
from openai.lib.streaming._deltas import accumulate_delta
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.httputil import header, post_json, raw_post, sse_events
from tests.kinds import CHATTING, EMBEDDING, KindCase, KindProxy, start_kinds
from tests.openai_schema import assert_valid, assert_valid_sse

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
def kind_proxy(proxy_factory: Any) -> Iterator[Any]:
    yield from start_kinds(proxy_factory)


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition never became true")


async def post(started: KindProxy, path: str, body: dict[str, Any]) -> tuple[Any, bytes]:
    proxy = started.proxy
    response, raw = await post_json(proxy.client, proxy.v1(path), body)
    return response, raw


# --------------------------------------------------------------------------
# Chat


@pytest.mark.parametrize("case", CHATTING)
@pytest_twisted.ensureDeferred
async def test_chat(kind_proxy: Any, case: KindCase) -> None:
    started: KindProxy = kind_proxy(case)
    response, raw = await post(started, "chat/completions", {"model": case.chat, "messages": HELLO})
    assert response.code == 200, raw
    answer = orjson.loads(raw)
    assert_valid("CreateChatCompletionResponse", answer)
    assert answer["model"] == case.chat
    assert answer["id"]
    assert answer["choices"][0]["message"]["content"].startswith("You said: Hello there")
    assert answer["usage"]["completion_tokens"] > 0
    assert header(response, "x-oproxy-backend") == case.kind


@pytest.mark.parametrize("case", CHATTING)
@pytest_twisted.ensureDeferred
async def test_stream(kind_proxy: Any, case: KindCase) -> None:
    started: KindProxy = kind_proxy(case)
    body = {"model": case.chat, "messages": HELLO, "stream": True}
    response, raw = await post(started, "chat/completions", body)
    assert response.code == 200, raw
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["model"] == case.chat and chunk["choices"] for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith("You said: Hello there")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("case", CHATTING)
@pytest_twisted.ensureDeferred
async def test_stream_with_usage(kind_proxy: Any, case: KindCase) -> None:
    started: KindProxy = kind_proxy(case)
    body = {
        "model": case.chat,
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response, raw = await post(started, "chat/completions", body)
    assert response.code == 200, raw
    *chunks, done = sse_events(raw)
    assert done == "[DONE]"
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", CHATTING)
@pytest_twisted.ensureDeferred
async def test_tools(kind_proxy: Any, case: KindCase, stream: bool) -> None:
    started: KindProxy = kind_proxy(case)
    asked = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    body = {"model": case.chat, "messages": asked, "tools": [WEATHER], "stream": stream}
    response, raw = await post(started, "chat/completions", body)
    assert response.code == 200, raw
    if not stream:
        answer = orjson.loads(raw)
        assert_valid("CreateChatCompletionResponse", answer)
        (call,) = answer["choices"][0]["message"]["tool_calls"]
        assert answer["choices"][0]["finish_reason"] == "tool_calls"
    else:
        chunks = sse_events(raw)[:-1]
        # Added up as the official SDK's stream helpers add deltas up.
        message: dict[object, object] = {}
        for chunk in chunks:
            accumulate_delta(message, chunk["choices"][0]["delta"])
        assert message["role"] == "assistant"
        (call,) = message["tool_calls"]  # type: ignore[misc]
        assert call["type"] == "function" and call["id"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Tokyo"}


@pytest.mark.parametrize("case", CHATTING)
@pytest_twisted.ensureDeferred
async def test_max_completion_tokens_limits_the_answer(kind_proxy: Any, case: KindCase) -> None:
    """
    The newer name for the limit limits, whatever name the server reads
    (llama.cpp and LM Studio ignore ``max_completion_tokens``).
    """
    started: KindProxy = kind_proxy(case)
    body = {"model": case.chat, "messages": HELLO, "max_completion_tokens": 3}
    response, raw = await post(started, "chat/completions", body)
    assert response.code == 200, raw
    answer = orjson.loads(raw)
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["choices"][0]["finish_reason"] == "length"


# --------------------------------------------------------------------------
# Embeddings


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("case", EMBEDDING)
@pytest_twisted.ensureDeferred
async def test_embeddings(kind_proxy: Any, case: KindCase, encoding: str) -> None:
    started: KindProxy = kind_proxy(case, "embed")
    body = {"model": case.embed, "input": ["a b", "c"], "encoding_format": encoding}
    response, raw = await post(started, "embeddings", body)
    assert response.code == 200, raw
    answer = orjson.loads(raw)
    schema = "CreateEmbeddingResponse" if encoding == "float" else "CreateEmbeddingResponseBase64"
    assert_valid(schema, answer)
    assert answer["model"] == case.embed
    assert [item["index"] for item in answer["data"]] == [0, 1]
    first = answer["data"][0]["embedding"]
    values = struct.unpack("<8f", base64.b64decode(first)) if encoding == "base64" else first
    assert abs(sum(v * v for v in values) - 1) < 1e-3  # unit vectors
    assert answer["usage"]["prompt_tokens"] == 3


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("case", CHATTING)
@pytest_twisted.ensureDeferred
async def test_errors(kind_proxy: Any, case: KindCase) -> None:
    started: KindProxy = kind_proxy(case)
    body = {"model": case.chat, "messages": HELLO}
    started.fake.fail_next(429, "too many requests", retry_after=2)
    response, raw = await post(started, "chat/completions", body)
    assert response.code == 503, raw
    assert header(response, "retry-after") == "2"
    assert_valid("ErrorResponse", orjson.loads(raw))
    started.fake.fail_next(500, "the GPU fell over")
    response, raw = await post(started, "chat/completions", body)
    assert response.code == 502, raw
    assert_valid("ErrorResponse", orjson.loads(raw))
    response, raw = await post(started, "chat/completions", {**body, "model": "no-such-model"})
    assert response.code == 404
    assert orjson.loads(raw)["error"]["code"] == "model_not_found"
    response, raw = await post(started, "chat/completions", {**body, "messages": []})
    assert response.code == 400, raw
    assert_valid("ErrorResponse", orjson.loads(raw))


@pytest.mark.parametrize("case", EMBEDDING)
@pytest_twisted.ensureDeferred
async def test_embedding_errors(kind_proxy: Any, case: KindCase) -> None:
    started: KindProxy = kind_proxy(case, "embed")
    started.fake.fail_next(503, "overloaded")
    response, raw = await post(started, "embeddings", {"model": case.embed, "input": "x"})
    assert response.code == 503, raw
    assert_valid("ErrorResponse", orjson.loads(raw))


# --------------------------------------------------------------------------
# Cancellation


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", CHATTING)
@pytest_twisted.ensureDeferred
async def test_client_leaving_closes_the_upstream(
    kind_proxy: Any, case: KindCase, stream: bool
) -> None:
    started: KindProxy = kind_proxy(case, "slow")
    fake = started.fake
    body = {"model": case.slow, "messages": HELLO, "stream": stream}
    client = await raw_post(started.proxy.url, "/v1/chat/completions", body)
    if stream:
        await wait_until(lambda: client.received.count(b"data: ") >= 2)
    else:
        await wait_until(lambda: fake.stats.in_flight == 1)
    client.transport.loseConnection()
    await wait_until(lambda: fake.stats.aborted == 1)
    assert fake.stats.completed == 0
    assert fake.pending_timers() == 0
