"""
The fake OpenAI-compatible server, over real loopback HTTP: every answer
checked against OpenAI's schemas, streams with and without usage, errors,
the bearer key, failure injection, pacing and cancellation, and its stats.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from oproxy.testing import FakeOpenAI, embed_vector
from oproxy.testing.openai import BROKEN_MESSAGE, DEFAULT_OPENAI_MODELS, FakeOpenAIModel
from oproxy.testing.openai.tap import Options, makeService
from tests.httputil import header, raw_post, sse_events
from tests.openai_schema import assert_valid, assert_valid_sse

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
ANSWER = "You said: Hello there, how are you. This is a fake answer from gpt-fake."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


@dataclass
class Served:
    """A fake on a loopback port, and a client with its own pool."""

    fake: FakeOpenAI
    url: str
    client: treq.client.HTTPClient
    port: Any

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        response = await self.client.post(
            self.url + path,
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        raw = await treq.content(response)
        return response.code, response, raw

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        response = await self.client.get(self.url + path, headers=headers or {})
        raw = await treq.content(response)
        return response.code, orjson.loads(raw)


def start(fake: FakeOpenAI) -> Served:
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    return Served(fake, f"http://127.0.0.1:{port.getHost().port}", client, port)


@pytest.fixture
def served() -> Iterator[Served]:
    running = start(FakeOpenAI(reactor))
    yield running
    pytest_twisted.blockon(running.port.stopListening())


@pytest.fixture
def keyed() -> Iterator[Served]:
    running = start(FakeOpenAI(reactor, api_key="sk-fake-secret-1234"))
    yield running
    pytest_twisted.blockon(running.port.stopListening())


def error_of(raw: bytes) -> dict[str, Any]:
    body = orjson.loads(raw)
    assert_valid("ErrorResponse", body)
    error: dict[str, Any] = body["error"]
    return error


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition never became true")


def stream_text(events: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for chunk in events
        if chunk != "[DONE]"
        for choice in chunk["choices"]
    )


# --------------------------------------------------------------------------
# Models and health


@pytest_twisted.ensureDeferred
async def test_models_list(served: Served) -> None:
    status, body = await served.get("/v1/models")
    assert status == 200
    assert_valid("ListModelsResponse", body)
    assert [m["id"] for m in body["data"]] == [m.id for m in DEFAULT_OPENAI_MODELS]


@pytest.mark.parametrize("path", ["org/fake-7b-instruct", "org%2Ffake-7b-instruct"])
@pytest_twisted.ensureDeferred
async def test_retrieve_model_with_a_slash(served: Served, path: str) -> None:
    status, body = await served.get(f"/v1/models/{path}")
    assert status == 200
    assert_valid("Model", body)
    assert body == {
        "id": "org/fake-7b-instruct",
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "org",
    }


@pytest_twisted.ensureDeferred
async def test_retrieve_unknown_model_is_model_not_found(served: Served) -> None:
    response = await served.client.get(served.url + "/v1/models/nope")
    assert response.code == 404
    error = error_of(await treq.content(response))
    assert error["code"] == "model_not_found"
    assert error["message"] == "The model `nope` does not exist or you do not have access to it."


@pytest_twisted.ensureDeferred
async def test_health(served: Served) -> None:
    assert await served.get("/health") == (200, {"status": "ok"})
    served.fake.health_status = 503
    status, body = await served.get("/health")
    assert status == 503
    assert_valid("ErrorResponse", body)
    served.fake.health_status = None
    status, body = await served.get("/health")
    assert status == 404
    assert body["error"]["message"] == "Invalid URL (GET /health)"


@pytest_twisted.ensureDeferred
async def test_unknown_route_and_wrong_method(served: Served) -> None:
    status, body = await served.get("/v1/nothing")
    assert status == 404
    assert_valid("ErrorResponse", body)
    status, body = await served.get("/v1/chat/completions")
    assert status == 405
    assert_valid("ErrorResponse", body)


# --------------------------------------------------------------------------
# Chat


@pytest_twisted.ensureDeferred
async def test_chat(served: Served) -> None:
    status, response, raw = await served.post(
        "/v1/chat/completions", {"model": "gpt-fake", "messages": HELLO}
    )
    assert status == 200
    assert header(response, "content-type") == "application/json"
    assert re.match(r"^req_[0-9a-f]{32}$", header(response, "x-request-id") or "")
    body = orjson.loads(raw)
    assert_valid("CreateChatCompletionResponse", body)
    assert body["model"] == "gpt-fake"
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER, "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 14, "total_tokens": 19}


@pytest_twisted.ensureDeferred
async def test_chat_content_parts_and_n(served: Served) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there, how are you?"}]}]
    status, _, raw = await served.post(
        "/v1/chat/completions", {"model": "gpt-fake", "messages": parts, "n": 2}
    )
    assert status == 200
    body = orjson.loads(raw)
    assert_valid("CreateChatCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert {c["message"]["content"] for c in body["choices"]} == {ANSWER}
    assert body["usage"]["completion_tokens"] == 28


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
@pytest_twisted.ensureDeferred
async def test_chat_token_limit(served: Served, key: str) -> None:
    _, _, raw = await served.post(
        "/v1/chat/completions", {"model": "gpt-fake", "messages": HELLO, key: 3}
    )
    body = orjson.loads(raw)
    assert body["choices"][0]["message"]["content"] == "You said: Hello"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


@pytest_twisted.ensureDeferred
async def test_chat_stream_without_usage(served: Served) -> None:
    status, response, raw = await served.post(
        "/v1/chat/completions", {"model": "gpt-fake", "messages": HELLO, "stream": True}
    )
    assert status == 200
    assert header(response, "content-type") == "text/event-stream; charset=utf-8"
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all("usage" not in chunk for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert stream_text(events) == ANSWER


@pytest_twisted.ensureDeferred
async def test_chat_stream_include_usage(served: Served) -> None:
    body = {
        "model": "gpt-fake",
        "messages": HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, _, raw = await served.post("/v1/chat/completions", body)
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    *chunks, last, done = events
    assert done == "[DONE]"
    assert all(chunk["usage"] is None for chunk in chunks)
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 14, "total_tokens": 19}


@pytest.mark.parametrize(
    ("path", "body", "schema", "choices"),
    [
        (
            "/v1/chat/completions",
            {"model": "gpt-fake", "messages": HELLO, "n": 2, "max_tokens": 4},
            "CreateChatCompletionStreamResponse",
            2,
        ),
        (
            "/v1/chat/completions",
            {"model": "gpt-fake", "messages": HELLO, "tools": [WEATHER_TOOL], "n": 2},
            "CreateChatCompletionStreamResponse",
            2,
        ),
        (
            "/v1/completions",
            {"model": "gpt-fake", "prompt": ["a b", "c"], "n": 2, "echo": True},
            "CreateCompletionStreamResponse",
            4,
        ),
        (
            "/v1/completions",
            {"model": "gpt-fake", "prompt": [1, 2, 3]},
            "CreateCompletionStreamResponse",
            1,
        ),
    ],
)
@pytest.mark.parametrize("include_usage", [False, True])
@pytest_twisted.ensureDeferred
async def test_every_stream_shape_is_valid(
    served: Served,
    path: str,
    body: dict[str, Any],
    schema: str,
    choices: int,
    include_usage: bool,
) -> None:
    streamed = {**body, "stream": True, "stream_options": {"include_usage": include_usage}}
    status, _, raw = await served.post(path, streamed)
    assert status == 200, raw
    assert_valid_sse(schema, raw.decode())
    events = sse_events(raw)[:-1]
    indexes = {choice["index"] for event in events for choice in event["choices"]}
    assert indexes == set(range(choices))
    finishes = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert len(finishes) == choices
    whole_status, _, whole = await served.post(path, body)
    assert whole_status == 200
    usage = orjson.loads(whole)["usage"]
    if include_usage:
        assert events[-1]["usage"] == usage
    else:
        assert all(event["choices"] for event in events)


@pytest_twisted.ensureDeferred
async def test_stream_options_without_stream_is_refused(served: Served) -> None:
    status, _, raw = await served.post(
        "/v1/chat/completions",
        {"model": "gpt-fake", "messages": HELLO, "stream_options": {"include_usage": True}},
    )
    assert status == 400
    assert error_of(raw)["param"] == "stream_options"


@pytest_twisted.ensureDeferred
async def test_chat_tool_call(served: Served) -> None:
    body = {"model": "gpt-fake", "messages": HELLO, "tools": [WEATHER_TOOL]}
    _, _, raw = await served.post("/v1/chat/completions", body)
    answer = orjson.loads(raw)
    assert_valid("CreateChatCompletionResponse", answer)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Tokyo", "days": 1}
    assert call["id"].startswith("call_")

    _, _, raw = await served.post("/v1/chat/completions", {**body, "stream": True})
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    chunks = sse_events(raw)[:-1]
    first = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first["id"] == call["id"]
    assert first["function"]["name"] == "get_weather"
    arguments = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for c in chunks
        if c["choices"][0]["delta"].get("tool_calls")
    )
    assert arguments == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest_twisted.ensureDeferred
async def test_chat_after_a_tool_result_and_tool_choice_none(served: Served) -> None:
    messages = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = {"model": "gpt-fake", "messages": messages, "tools": [WEATHER_TOOL]}
    _, _, raw = await served.post("/v1/chat/completions", body)
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "The tool returned: sunny"
    body = {"model": "gpt-fake", "messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": "none"}
    _, _, raw = await served.post("/v1/chat/completions", body)
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": HELLO}, None, None),
        ({"model": "gpt-fake"}, "messages", "missing_required_parameter"),
        ({"model": "gpt-fake", "messages": []}, "messages", "empty_array"),
        ({"model": "gpt-fake", "messages": [{"content": "x"}]}, "messages[0].role", None),
        ({"model": "gpt-fake", "messages": HELLO, "stream": "yes"}, "stream", "invalid_type"),
        ({"model": "gpt-fake", "messages": HELLO, "max_tokens": 0}, "max_tokens", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_chat_bad_requests(served: Served, body: Any, param: str | None, code: Any) -> None:
    status, _, raw = await served.post("/v1/chat/completions", body)
    assert status == 400
    error = error_of(raw)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest_twisted.ensureDeferred
async def test_malformed_json(served: Served) -> None:
    response = await served.client.post(served.url + "/v1/chat/completions", data=b"{nope")
    assert response.code == 400
    assert "could not parse the JSON body" in error_of(await treq.content(response))["message"]


@pytest_twisted.ensureDeferred
async def test_unknown_model_is_404(served: Served) -> None:
    for path, body in [
        ("/v1/chat/completions", {"model": "nope", "messages": HELLO}),
        ("/v1/completions", {"model": "nope", "prompt": "x"}),
        ("/v1/embeddings", {"model": "nope", "input": "x"}),
    ]:
        status, _, raw = await served.post(path, body)
        assert status == 404
        assert error_of(raw)["code"] == "model_not_found"


# --------------------------------------------------------------------------
# Completions


@pytest_twisted.ensureDeferred
async def test_completions(served: Served) -> None:
    body = {"model": "gpt-fake", "prompt": ["Once upon a time", "Hi"], "echo": True}
    status, _, raw = await served.post("/v1/completions", body)
    assert status == 200
    answer = orjson.loads(raw)
    assert_valid("CreateCompletionResponse", answer)
    texts = [c["text"] for c in answer["choices"]]
    assert texts == [
        "Once upon a timeYou said: Once upon a time. This is a fake answer from gpt-fake.",
        "HiYou said: Hi. This is a fake answer from gpt-fake.",
    ]
    assert answer["usage"]["prompt_tokens"] == 5


@pytest_twisted.ensureDeferred
async def test_completions_default_max_tokens_is_16(served: Served) -> None:
    prompt = "one two three four five six seven eight nine"
    _, _, raw = await served.post("/v1/completions", {"model": "gpt-fake", "prompt": prompt})
    choice = orjson.loads(raw)["choices"][0]
    assert choice["finish_reason"] == "length"
    assert orjson.loads(raw)["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("include_usage", [False, True])
@pytest_twisted.ensureDeferred
async def test_completions_stream(served: Served, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": "gpt-fake", "prompt": "Hi", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    _, _, raw = await served.post("/v1/completions", body)
    assert_valid_sse("CreateCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == (
        "You said: Hi. This is a fake answer from gpt-fake."
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    usage_chunks = [e for e in events[:-1] if not e["choices"]]
    if include_usage:
        assert [c["usage"]["completion_tokens"] for c in usage_chunks] == [10]
    else:
        assert usage_chunks == []


# --------------------------------------------------------------------------
# Embeddings


@pytest_twisted.ensureDeferred
async def test_embeddings_float_and_base64(served: Served) -> None:
    body = {"model": "embed-fake", "input": ["a b", "c"]}
    status, _, raw = await served.post("/v1/embeddings", body)
    assert status == 200
    floats = orjson.loads(raw)
    assert_valid("CreateEmbeddingResponse", floats)
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert floats["data"][0]["embedding"] == embed_vector("a b", 8)

    _, _, raw = await served.post("/v1/embeddings", {**body, "encoding_format": "base64"})
    encoded = orjson.loads(raw)
    assert_valid("CreateEmbeddingResponseBase64", encoded)
    for plain, packed in zip(floats["data"], encoded["data"], strict=True):
        decoded = struct.unpack("<8f", base64.b64decode(packed["embedding"]))
        assert decoded == pytest.approx(plain["embedding"], rel=1e-6)


@pytest_twisted.ensureDeferred
async def test_embeddings_dimensions_and_bad_input(served: Served) -> None:
    _, _, raw = await served.post(
        "/v1/embeddings", {"model": "embed-fake", "input": "x", "dimensions": 4}
    )
    assert len(orjson.loads(raw)["data"][0]["embedding"]) == 4
    status, _, raw = await served.post("/v1/embeddings", {"model": "embed-fake", "input": ""})
    assert status == 400
    assert error_of(raw)["param"] == "input"
    status, _, raw = await served.post(
        "/v1/embeddings", {"model": "embed-fake", "input": "x", "encoding_format": "hex"}
    )
    assert status == 400
    assert error_of(raw)["param"] == "encoding_format"


# --------------------------------------------------------------------------
# Authentication


@pytest_twisted.ensureDeferred
async def test_key_required(keyed: Served) -> None:
    status, _, raw = await keyed.post("/v1/chat/completions", {"model": "gpt-fake"})
    assert status == 401
    error = error_of(raw)
    assert error["code"] is None
    assert "didn't provide an API key" in error["message"]

    wrong = {"Authorization": "Bearer sk-wrong-key-9999"}
    status, _, raw = await keyed.post("/v1/chat/completions", {"model": "gpt-fake"}, wrong)
    assert status == 401
    error = error_of(raw)
    assert error["code"] == "invalid_api_key"
    assert "sk-***9999" in error["message"]

    right = {"Authorization": "Bearer sk-fake-secret-1234"}
    status, _, _ = await keyed.post(
        "/v1/chat/completions", {"model": "gpt-fake", "messages": HELLO}, right
    )
    assert status == 200
    assert keyed.fake.stats.last_request is not None
    assert keyed.fake.stats.last_request.headers["authorization"] == right["Authorization"]
    assert (await keyed.get("/health"))[0] == 200  # no key needed
    assert (await keyed.get("/v1/models"))[0] == 401


# --------------------------------------------------------------------------
# Failures, pacing and cancellation


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (429, "requests", "rate_limit_exceeded"),
        (500, "server_error", None),
        (503, "server_error", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_fail_next(served: Served, status: int, kind: str, code: str | None) -> None:
    served.fake.fail_next(status, times=2, retry_after=7)
    body = {"model": "gpt-fake", "messages": HELLO}
    for _ in range(2):
        got, response, raw = await served.post("/v1/chat/completions", body)
        assert got == status
        error = error_of(raw)
        assert (error["type"], error["code"]) == (kind, code)
        assert header(response, "retry-after") == "7"
    got, _, _ = await served.post("/v1/chat/completions", body)
    assert got == 200


@pytest_twisted.ensureDeferred
async def test_fail_over_http_and_reset(served: Served) -> None:
    await served.post("/_fake/fail", {"status": 502, "message": "bad gateway", "times": 1})
    status, _, raw = await served.post("/v1/embeddings", {"model": "embed-fake", "input": "x"})
    assert status == 502
    assert error_of(raw)["message"] == "bad gateway"
    await served.post("/_fake/reset", {})
    status, stats = await served.get("/_fake/stats")
    assert stats["requests"] == 0


@pytest_twisted.ensureDeferred
async def test_stats_show_what_was_sent(served: Served) -> None:
    body = {"model": "gpt-fake", "messages": HELLO, "stream": True}
    await served.post("/v1/chat/completions", body, {"Authorization": "Bearer abc"})
    status, stats = await served.get("/_fake/stats")
    assert status == 200
    assert stats["requests"] == 1
    assert (stats["started"], stats["completed"], stats["in_flight"]) == (1, 1, 0)
    last = stats["last_request"]
    assert last["method"] == "POST"
    assert last["path"] == "/v1/chat/completions"
    assert last["body"] == body
    assert last["headers"]["authorization"] == "Bearer abc"


@pytest_twisted.ensureDeferred
async def test_stats_count_the_usage_of_every_answer(served: Served) -> None:
    chat = {"model": "gpt-fake", "messages": HELLO}
    _, _, raw = await served.post("/v1/chat/completions", chat)
    said = orjson.loads(raw)["usage"]
    usage = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    _, _, raw = await served.post("/v1/chat/completions", usage)
    streamed = sse_events(raw)[-2]["usage"]
    await served.post("/v1/chat/completions", {**chat, "stream": True})  # usage not asked for
    prompt = {"model": "org/fake-7b-instruct", "prompt": ["one two", "three"], "max_tokens": 5}
    _, _, raw = await served.post("/v1/completions", prompt)
    completed = orjson.loads(raw)["usage"]
    _, _, raw = await served.post("/v1/embeddings", {"model": "embed-fake", "input": "a b c"})
    embedded = orjson.loads(raw)["usage"]
    await served.post("/v1/chat/completions", {"model": "broken", "messages": HELLO})
    _, stats = await served.get("/_fake/stats")
    assert said == streamed
    by_model = {
        "gpt-fake": {
            "prompt_tokens": 3 * said["prompt_tokens"],
            "completion_tokens": 3 * said["completion_tokens"],
        },
        "org/fake-7b-instruct": {
            "prompt_tokens": completed["prompt_tokens"],
            "completion_tokens": completed["completion_tokens"],
        },
        "embed-fake": {"prompt_tokens": embedded["prompt_tokens"], "completion_tokens": 0},
    }
    assert stats["tokens_by_model"] == by_model
    assert stats["prompt_tokens"] == sum(m["prompt_tokens"] for m in by_model.values())
    assert stats["completion_tokens"] == sum(m["completion_tokens"] for m in by_model.values())
    assert stats["failed"] == 1
    await served.post("/_fake/reset", {})
    _, stats = await served.get("/_fake/stats")
    assert (stats["prompt_tokens"], stats["completion_tokens"], stats["tokens_by_model"]) == (
        0,
        0,
        {},
    )


@pytest_twisted.ensureDeferred
async def test_broken_model(served: Served) -> None:
    body = {"model": "broken", "messages": HELLO}
    status, _, raw = await served.post("/v1/chat/completions", body)
    assert status == 500
    assert error_of(raw)["message"] == BROKEN_MESSAGE
    status, _, raw = await served.post("/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    events = sse_events(raw)
    assert "[DONE]" not in events
    assert len(events) == 4
    assert_valid("ErrorResponse", events[-1])
    assert served.fake.stats.failed == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_client_leaving_aborts_the_generation(served: Served, stream: bool) -> None:
    client = await raw_post(
        served.url, "/v1/chat/completions", {"model": "slow", "messages": HELLO, "stream": stream}
    )
    if stream:
        await wait_until(lambda: client.received.count(b"data: ") >= 2)
    else:
        await wait_until(lambda: served.fake.stats.in_flight == 1)
    client.transport.loseConnection()
    await wait_until(lambda: served.fake.stats.aborted == 1)
    assert served.fake.stats.aborted_streams == (1 if stream else 0)
    assert served.fake.stats.in_flight == 0
    assert served.fake.pending_timers() == 0
    assert served.fake.stats.tokens == {}


@pytest.mark.parametrize(("model", "events"), [("stall", 0), ("stall-midway", 2)])
@pytest_twisted.ensureDeferred
async def test_stalling_models(served: Served, model: str, events: int) -> None:
    client = await raw_post(
        served.url, "/v1/chat/completions", {"model": model, "messages": HELLO, "stream": True}
    )
    await wait_until(lambda: served.fake.stats.in_flight == 1)
    await deferLater(reactor, 0.2, lambda: None)
    assert client.received.count(b"data: ") == events
    if not events:
        assert client.received == b""
    client.transport.loseConnection()
    await wait_until(lambda: served.fake.stats.aborted_streams == 1)


@pytest_twisted.ensureDeferred
async def test_pacing_follows_the_injected_clock() -> None:
    clock = Clock()
    running = start(FakeOpenAI(clock, models=[FakeOpenAIModel("m", token_delay=1.0)]))
    try:
        body = {"model": "m", "messages": HELLO}
        answer = Deferred.fromCoroutine(running.post("/v1/chat/completions", body))
        await wait_until(lambda: running.fake.stats.in_flight == 1)
        clock.advance(15)  # 14 tokens, the role and the finish: 16 ticks
        await deferLater(reactor, 0.05, lambda: None)
        assert not answer.called
        assert running.fake.pending_timers() == 1
        clock.advance(1)
        status, _, raw = await answer
        assert status == 200
        assert orjson.loads(raw)["usage"]["completion_tokens"] == 14
        assert running.fake.pending_timers() == 0
    finally:
        await running.port.stopListening()


# --------------------------------------------------------------------------
# Running it


def test_tap_options_and_service() -> None:
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--api-key", "k", "--no-health"])
    assert options["api-key"] == "k"
    assert options["no-health"]
    assert makeService(options) is not None


@pytest_twisted.ensureDeferred
async def test_tap_stats_file_holds_the_final_counters(served: Served, tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--stats-file", str(stats_file)])
    service = makeService(options)
    service.startService()
    port = (await service._waitingForPort).getHost().port  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    chat = {"model": "gpt-fake", "messages": HELLO}
    response = await served.client.post(url + "/v1/chat/completions", data=orjson.dumps(chat))
    usage = orjson.loads(await treq.content(response))["usage"]
    streaming = await raw_post(
        url, "/v1/chat/completions", {**chat, "model": "slow", "stream": True}
    )
    await wait_until(lambda: streaming.received.count(b"data: ") >= 1)
    await service.stopService()
    await wait_until(lambda: not streaming.transport.connected)
    counters = orjson.loads(stats_file.read_bytes())
    assert (counters["started"], counters["completed"], counters["aborted_streams"]) == (2, 1, 1)
    assert counters["in_flight"] == 0
    assert counters["prompt_tokens"] == usage["prompt_tokens"]
    assert counters["completion_tokens"] == usage["completion_tokens"]


def test_earlier_module_names_still_work() -> None:
    from oproxy import service_makers
    from oproxy.testing import fake_openai, fake_openai_tap, openai
    from oproxy.testing.openai import tap

    assert fake_openai.FakeOpenAI is openai.FakeOpenAI is FakeOpenAI
    assert fake_openai.BROKEN_MESSAGE == BROKEN_MESSAGE
    assert fake_openai.main is tap.main
    assert (fake_openai_tap.Options, fake_openai_tap.makeService) == (Options, makeService)
    assert service_makers.oproxyFakeOpenAI.module == "oproxy.testing.openai.tap"


class ServerProcess(ProcessProtocol):
    """``python -m oproxy.testing.openai`` (or its earlier name) as a child process."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.first_line: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.first_line.called:
            self.first_line.callback(self.out.split(b"\n")[0].decode())

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@pytest.mark.parametrize("module", ["oproxy.testing.openai", "oproxy.testing.fake_openai"])
@pytest_twisted.ensureDeferred
async def test_module_main(served: Served, module: str) -> None:
    child = ServerProcess()
    argv = [sys.executable, "-m", module, "--port", "0", "--api-key", "k"]
    reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
    try:
        line = await child.first_line
        match = re.match(r"^fake openai listening on (http://127\.0\.0\.1:\d+)$", line)
        assert match, line
        response = await served.client.get(
            match.group(1) + "/v1/models", headers={"Authorization": "Bearer k"}
        )
        assert response.code == 200
        assert_valid("ListModelsResponse", orjson.loads(await treq.content(response)))
    finally:
        child.transport.signalProcess("TERM")
        await child.ended
    assert child.err == b""
