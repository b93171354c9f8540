"""
The fake Ollama server, over real loopback HTTP, checked against the
checklist of ``ollama-native-api.md`` (section 12): framing, field order,
errors, tool calls, thinking, limits, embeddings, model management, the
Host check, and cancellation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from oproxy.testing import (
    BROKEN_ERROR,
    CRASH_ERROR,
    DEFAULT_MODELS,
    FakeModel,
    FakeOllama,
    embed_vector,
    raw_embedding,
)
from oproxy.testing.ollama.tap import Options, makeService

NANO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
NANO_ANY = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
CALL_ID = re.compile(r"^call_[a-z0-9]{8}$")
JSON_TYPE = [b"application/json; charset=utf-8"]
NDJSON_TYPE = [b"application/x-ndjson"]
METRICS = [
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
]
# a 1x1 transparent PNG: 68 bytes once decoded
PNG_1X1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "detailed": {"type": "boolean"},
            },
        },
    },
}
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
HELLO_ANSWER = "You said: Hello there, how are you. This is a fake answer from llama3.2."


# --------------------------------------------------------------------------
# Harness


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes
    length: Any = None  # Content-Length (Twisted keeps it out of ``headers``)

    def header(self, name: bytes) -> list[bytes] | None:
        return self.headers.getRawHeaders(name)

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        assert self.body.endswith(b"\n"), self.body
        return [json.loads(line) for line in self.body.split(b"\n")[:-1]]


@dataclass
class Served:
    """
    A fake listening on 127.0.0.1 with its own connection pool, and a log
    of every ``request.write`` (data, whether the client was already gone).
    """

    fake: FakeOllama
    writes: list[tuple[bytes, bool]] = field(default_factory=list)
    port: Any = None
    pool: HTTPConnectionPool | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def start(self) -> None:
        writes = self.writes

        class RecordingRequest(Request):
            def write(self, data: bytes) -> None:
                writes.append((data, self._disconnected))
                super().write(data)

        site = Site(self.fake.resource(), requestFactory=RecordingRequest)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def close(self) -> None:
        assert self.pool is not None
        await self.pool.closeCachedConnections()
        await self.port.stopListening()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await treq.request(
            method,
            self.url + path,
            data=data,
            headers=headers,
            agent=Agent(reactor, pool=self.pool),
        )
        content = await treq.content(response)
        return Reply(response.code, response.headers, content, response.length)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Reply:
        return await self.call("POST", path, body, **kwargs)

    async def error(self, path: str, body: Any, status: int, message: str, **kw: Any) -> None:
        reply = await self.post(path, body, **kw)
        assert (reply.code, reply.json()) == (status, {"error": message}), reply.body
        assert reply.header(b"content-type") == JSON_TYPE


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**kwargs: Any) -> Served:
        served = Served(FakeOllama(kwargs.pop("clock", reactor), **kwargs))
        served.start()
        started.append(served)
        return served

    yield start
    for served in started:
        await served.close()


@pytest_twisted.async_yield_fixture
async def ollama(serve: Callable[..., Served]) -> AsyncIterator[Served]:
    yield serve()


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = reactor.seconds() + within
    while not condition():
        assert reactor.seconds() < deadline, "condition never became true"
        await deferLater(reactor, 0.005, lambda: None)


class RawClient(Protocol):
    """
    A bare HTTP/1.1 client, to read a stream incrementally and to drop the
    connection mid-stream.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(None)

    def count(self, needle: bytes) -> int:
        return self.data.count(needle)


async def raw_post(served: Served | int, path: str, body: Any) -> RawClient:
    """``body`` posted to a fake (or a port) by a :class:`RawClient`."""
    payload = json.dumps(body).encode()
    port = served if isinstance(served, int) else served.port.getHost().port
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = await connectProtocol(endpoint, RawClient())
    client.transport.write(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload)
    )
    return client


def text_of(lines: list[dict[str, Any]], key: str = "content") -> str:
    return "".join(line["message"].get(key, "") for line in lines)


def check_metrics(final: dict[str, Any]) -> None:
    present = [key for key in final if key in METRICS]
    assert present == [key for key in METRICS if key in final]
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0, key
    assert all(final[key] != 0 for key in present)


# --------------------------------------------------------------------------
# Basics: root, version, 404/405, Host check


@pytest_twisted.ensureDeferred
async def test_root_and_head(ollama: Served) -> None:
    reply = await ollama.call("GET", "/")
    assert (reply.code, reply.body) == (200, b"Ollama is running")
    assert reply.header(b"content-type") == [b"text/plain; charset=utf-8"]
    assert reply.header(b"server") is None
    head = await ollama.call("HEAD", "/")
    assert (head.code, head.body) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_version(serve: Callable[..., Served]) -> None:
    served = serve(version="0.13.5")
    reply = await served.call("GET", "/api/version")
    assert reply.body == b'{"version":"0.13.5"}'
    assert reply.header(b"content-type") == JSON_TYPE
    assert (await served.call("HEAD", "/api/version")).code == 200


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", ["/nope", "/api/chat/", "/v2/models", "/api"])
async def test_unknown_route(ollama: Served, path: str) -> None:
    reply = await ollama.call("GET", path)
    assert (reply.code, reply.body) == (404, b"404 page not found")
    assert reply.header(b"content-type") == [b"text/plain"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/chat"),
        ("PUT", "/api/generate"),
        ("POST", "/api/tags"),
        ("HEAD", "/api/ps"),
        ("POST", "/api/delete"),
        ("GET", "/api/show"),
    ],
)
async def test_wrong_method(ollama: Served, method: str, path: str) -> None:
    reply = await ollama.call(method, path)
    assert reply.code == 405
    if method != "HEAD":
        assert reply.body == b"405 method not allowed"
    assert reply.header(b"content-type") == [b"text/plain"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("evil.example.com", False),
        ("example.com:11434", False),
        ("[::1]", False),
        ("localhost", True),
        ("localhost:11434", True),
        ("127.0.0.1:11434", True),
        ("[::1]:11434", True),
        ("0.0.0.0", True),
        ("192.168.1.20:8080", True),
        ("10.1.2.3", True),
        ("ollama.internal", True),
        ("box.local:11434", True),
        ("app.localhost", True),
    ],
)
async def test_host_check(serve: Callable[..., Served], host: str, allowed: bool) -> None:
    served = serve(host_check=True)
    reply = await served.call("GET", "/api/tags", headers={"Host": host})
    if allowed:
        assert reply.code == 200
    else:
        assert (reply.code, reply.body) == (403, b"")
        assert reply.header(b"content-type") is None


@pytest_twisted.ensureDeferred
async def test_host_check_is_off_by_default(ollama: Served) -> None:
    reply = await ollama.call("GET", "/", headers={"Host": "evil.example.com"})
    assert reply.code == 200


# --------------------------------------------------------------------------
# /api/chat


@pytest_twisted.ensureDeferred
async def test_chat_streams_ndjson(ollama: Served) -> None:
    reply = await ollama.post("/api/chat", {"model": "llama3.2", "messages": HELLO})
    assert reply.code == 200
    assert reply.header(b"content-type") == NDJSON_TYPE
    lines = reply.lines()
    *chunks, final = lines
    for chunk in chunks:
        assert list(chunk) == ["model", "created_at", "message", "done"]
        assert list(chunk["message"]) == ["role", "content"]
        assert chunk["model"] == "llama3.2"
        assert chunk["message"]["role"] == "assistant"
        assert chunk["done"] is False
        assert NANO_UTC.match(chunk["created_at"])
    assert text_of(chunks) == HELLO_ANSWER
    assert [c["message"]["content"] for c in chunks[:3]] == ["You", " said:", " Hello"]
    assert list(final)[:5] == ["model", "created_at", "message", "done", "done_reason"]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["done"], final["done_reason"]) == (True, "stop")
    assert final["eval_count"] == len(chunks)
    assert final["prompt_eval_count"] == 5
    check_metrics(final)


@pytest_twisted.ensureDeferred
async def test_each_line_is_its_own_write(ollama: Served) -> None:
    await ollama.post("/api/chat", {"model": "llama3.2", "messages": HELLO})
    lines = [data for data, _ in ollama.writes]
    assert len(lines) == len(HELLO_ANSWER.split()) + 1
    for data in lines:
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        json.loads(data)


@pytest_twisted.ensureDeferred
async def test_chat_without_streaming(ollama: Served) -> None:
    body = {"model": "llama3.2", "messages": HELLO, "stream": False}
    reply = await ollama.post("/api/chat", body)
    assert reply.header(b"content-type") == JSON_TYPE
    assert reply.length == len(reply.body)
    answer = reply.json()
    assert list(answer) == ["model", "created_at", "message", "done", "done_reason", *METRICS]
    assert answer["message"] == {"role": "assistant", "content": HELLO_ANSWER}
    check_metrics(answer)


@pytest_twisted.ensureDeferred
async def test_go_escapes_html_in_json(ollama: Served) -> None:
    messages = [{"role": "user", "content": "a <b> & c"}]
    reply = await ollama.post(
        "/api/chat", {"model": "llama3.2", "messages": messages, "stream": False}
    )
    assert b"\\u003cb\\u003e \\u0026 c" in reply.body
    assert reply.json()["message"]["content"].startswith("You said: a <b> & c.")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("name", ["llama3.2", "LLAMA3.2:Latest", "library/llama3.2", "Llama3.2"])
async def test_model_names_resolve_and_echo(ollama: Served, name: str) -> None:
    reply = await ollama.post("/api/chat", {"model": name, "messages": HELLO, "stream": False})
    assert reply.code == 200
    assert reply.json()["model"] == name


@pytest_twisted.ensureDeferred
async def test_chat_load_and_unload(ollama: Served) -> None:
    reply = await ollama.post("/api/chat", {"model": "llama3.2"})
    assert reply.header(b"content-type") == JSON_TYPE
    load = reply.json()
    assert list(load) == ["model", "created_at", "message", "done", "done_reason"]
    assert load["message"] == {"role": "assistant", "content": ""}
    assert (load["done"], load["done_reason"]) == (True, "load")
    ps = (await ollama.call("GET", "/api/ps")).json()
    assert [m["name"] for m in ps["models"]] == ["llama3.2:latest"]
    unload = await ollama.post("/api/chat", {"model": "llama3.2", "messages": [], "keep_alive": 0})
    assert unload.json()["done_reason"] == "unload"
    assert (await ollama.call("GET", "/api/ps")).json() == {"models": []}


CHAT_ERRORS: list[tuple[Any, int, str]] = [
    (b"", 400, "missing request body"),
    (b"   \n", 400, "missing request body"),
    (b"{bad", 400, "invalid character 'b' looking for beginning of object key string"),
    (b"xyz", 400, "invalid character 'x' looking for beginning of value"),
    (b'{"model":', 400, "unexpected EOF"),
    (
        b'{"model":"llama3.2",}',
        400,
        "invalid character '}' looking for beginning of object key string",
    ),
    (b"[]", 400, "json: cannot unmarshal array into Go value of type api.ChatRequest"),
    ({"messages": HELLO}, 400, "model is required"),
    ({"model": "  ", "messages": HELLO}, 400, "model is required"),
    ({"model": "bad name!", "messages": HELLO}, 400, "invalid model name"),
    ({"model": "nope", "messages": HELLO}, 404, "model 'nope' not found"),
    ({"model": "all-minilm", "messages": HELLO}, 400, '"all-minilm" does not support chat'),
    (
        {"model": "llava", "messages": HELLO, "tools": [WEATHER_TOOL]},
        400,
        "registry.ollama.ai/library/llava:latest does not support tools",
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "think": True},
        400,
        '"llama3.2" does not support thinking',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "think": "low"},
        400,
        '"llama3.2" does not support thinking',
    ),
    (
        {"model": "qwen3", "messages": HELLO, "think": "extreme"},
        400,
        'invalid think value: "extreme" (must be "high", "medium", "low", "max", true, or false)',
    ),
    (
        {"model": "qwen3", "messages": HELLO, "think": 1},
        400,
        'think must be a boolean or string ("high", "medium", "low", "max", true, or false)',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs must be between 0 and 20",
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "top_logprobs": -1},
        400,
        "top_logprobs must be between 0 and 20",
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "options": {"stop": "x"}},
        500,
        'option "stop" must be of type array',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "options": {"temperature": "hot"}},
        500,
        'option "temperature" must be of type float32',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "options": {"num_predict": True}},
        500,
        'option "num_predict" must be of type integer',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "options": {"stop": [1]}},
        500,
        'option "stop" must be of an array of strings',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "format": "xml"},
        500,
        'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "keep_alive": "abc"},
        400,
        'time: invalid duration "abc"',
    ),
    (
        {"model": "llama3.2", "messages": HELLO, "keep_alive": "5"},
        400,
        'time: missing unit in duration "5"',
    ),
    ({"model": "llama3.2", "messages": HELLO, "keep_alive": True}, 400, "Unsupported type: 'bool'"),
    (
        {"model": "llama3.2", "messages": HELLO, "stream": "no"},
        400,
        "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool",
    ),
    (
        {"model": "llama3.2", "messages": "hi"},
        400,
        "json: cannot unmarshal string into Go struct field ChatRequest.messages"
        " of type []api.Message",
    ),
    (
        {"model": "llama3.2", "messages": [1]},
        400,
        "json: cannot unmarshal number into Go struct field ChatRequest.messages"
        " of type api.Message",
    ),
    (
        {"model": "llama3.2", "messages": [{"role": "user", "content": 5}]},
        400,
        "json: cannot unmarshal number into Go struct field Message.messages.content"
        " of type string",
    ),
    (
        {"model": "llama3.2", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        400,
        "json: cannot unmarshal array into Go struct field Message.messages.content of type string",
    ),
    (
        {
            "model": "llama3.2",
            "messages": [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}],
                }
            ],
        },
        400,
        "json: cannot unmarshal string into Go struct field ToolCallFunction.messages.tool_calls"
        ".function.arguments of type api.ToolCallFunctionArguments",
    ),
    (
        {
            "model": "llava",
            "messages": [
                {"role": "user", "content": "x", "images": ["data:image/png;base64," + PNG_1X1]}
            ],
        },
        400,
        "illegal base64 data at input byte 4",
    ),
    (
        {"model": "llava", "messages": [{"role": "user", "content": "x", "images": ["YWJj!"]}]},
        400,
        "illegal base64 data at input byte 4",
    ),
    ({"model": "crash", "messages": HELLO}, 500, CRASH_ERROR),
    ({"model": "crash", "messages": HELLO, "stream": False}, 500, CRASH_ERROR),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("body", "status", "message"), CHAT_ERRORS)
async def test_chat_errors(ollama: Served, body: Any, status: int, message: str) -> None:
    raw = body if isinstance(body, bytes) else None
    await ollama.error("/api/chat", None if raw is not None else body, status, message, raw=raw)
    assert ollama.fake.stats.started == 0


@pytest_twisted.ensureDeferred
async def test_unknown_fields_and_case_insensitive_keys(ollama: Served) -> None:
    body = {"Model": "llama3.2", "MESSAGES": HELLO, "Stream": False, "whatever": [1, 2]}
    reply = await ollama.post("/api/chat", body)
    assert reply.json()["message"]["content"] == HELLO_ANSWER
    assert ollama.fake.stats.requests == [("/api/chat", body)]


@pytest_twisted.ensureDeferred
async def test_tool_call_streaming(ollama: Served) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "Weather?"}]}
    reply = await ollama.post("/api/chat", {**body, "tools": [WEATHER_TOOL]})
    call_line, final = reply.lines()
    assert call_line["done"] is False
    assert list(call_line["message"]) == ["role", "content", "tool_calls"]
    assert call_line["message"]["content"] == ""
    [call] = call_line["message"]["tool_calls"]
    assert list(call) == ["id", "function"]
    assert CALL_ID.match(call["id"])
    assert list(call["function"]) == ["index", "name", "arguments"]
    assert call["function"]["index"] == 0
    assert call["function"]["name"] == "get_weather"
    arguments = call["function"]["arguments"]
    assert arguments == {"city": "Tokyo", "unit": "celsius", "days": 1, "detailed": True}
    assert list(arguments) == ["city", "unit", "days", "detailed"]
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["done"], final["done_reason"]) == (True, "stop")


@pytest_twisted.ensureDeferred
async def test_tool_call_without_streaming(ollama: Served) -> None:
    body = {
        "model": "qwen3",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER_TOOL],
        "stream": False,
        "think": False,
    }
    answer = (await ollama.post("/api/chat", body)).json()
    message = answer["message"]
    assert list(message) == ["role", "content", "tool_calls"]
    assert message["content"] == ""
    [call] = message["tool_calls"]
    assert call["function"]["arguments"]["city"] == "Tokyo"
    assert answer["done_reason"] == "stop"
    again = (await ollama.post("/api/chat", body)).json()
    assert again["message"]["tool_calls"][0]["id"] == call["id"]


@pytest_twisted.ensureDeferred
async def test_tool_result_reaches_the_model(ollama: Served) -> None:
    messages = [
        {"role": "user", "content": "Weather in Tokyo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}],
        },
        {"role": "tool", "content": "22 degrees and sunny", "tool_name": "get_weather"},
    ]
    body = {"model": "llama3.2", "messages": messages, "tools": [WEATHER_TOOL], "stream": False}
    answer = (await ollama.post("/api/chat", body)).json()
    assert answer["message"] == {
        "role": "assistant",
        "content": "The tool returned: 22 degrees and sunny",
    }


@pytest_twisted.ensureDeferred
async def test_thinking_model_thinks_by_default(ollama: Served) -> None:
    body = {"model": "qwen3", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    *chunks, final = (await ollama.post("/api/chat", body)).lines()
    thinking = [c for c in chunks if "thinking" in c["message"]]
    answer = [c for c in chunks if "thinking" not in c["message"]]
    assert thinking and answer
    assert chunks[: len(thinking)] == thinking  # thinking first
    assert list(thinking[0]["message"]) == ["role", "content", "thinking"]
    assert all(c["message"]["content"] == "" for c in thinking)
    assert (
        text_of(thinking, "thinking")
        == "The user wrote: Why is the sky blue. I should answer briefly."
    )
    assert text_of(answer) == "You said: Why is the sky blue. This is a fake answer from qwen3."
    assert final["eval_count"] == len(chunks)

    for think in (True, "high", "max"):
        whole = (await ollama.post("/api/chat", {**body, "stream": False, "think": think})).json()
        assert whole["message"]["thinking"].startswith("The user wrote:")

    off = (await ollama.post("/api/chat", {**body, "stream": False, "think": False})).json()
    assert "thinking" not in off["message"]
    assert off["message"]["content"].startswith("You said:")


@pytest_twisted.ensureDeferred
async def test_num_predict_stops_with_length(ollama: Served) -> None:
    body = {"model": "llama3.2", "messages": HELLO, "options": {"num_predict": 3, "seed": 42}}
    *chunks, final = (await ollama.post("/api/chat", body)).lines()
    assert text_of(chunks) == "You said: Hello"
    assert final["done_reason"] == "length"
    assert final["eval_count"] == 3
    whole = (await ollama.post("/api/chat", {**body, "stream": False})).json()
    assert (whole["message"]["content"], whole["done_reason"]) == ("You said: Hello", "length")


@pytest_twisted.ensureDeferred
async def test_stop_sequences(ollama: Served) -> None:
    body = {
        "model": "llama3.2",
        "messages": HELLO,
        "stream": False,
        "options": {"stop": ["fake", "zzz"]},
    }
    whole = (await ollama.post("/api/chat", body)).json()
    assert whole["message"]["content"] == "You said: Hello there, how are you. This is a "
    assert whole["done_reason"] == "stop"


@pytest_twisted.ensureDeferred
async def test_logprobs(ollama: Served) -> None:
    body = {"model": "llama3.2", "messages": HELLO, "logprobs": True, "top_logprobs": 3}
    *chunks, final = (await ollama.post("/api/chat", body)).lines()
    assert "logprobs" not in final
    for chunk in chunks:
        assert list(chunk) == ["model", "created_at", "message", "done", "logprobs"]
        [entry] = chunk["logprobs"]
        assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
        assert entry["token"] == chunk["message"]["content"]
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] < 0
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert [e["logprob"] for e in entry["top_logprobs"]] == sorted(
            (e["logprob"] for e in entry["top_logprobs"]), reverse=True
        )
    whole = (await ollama.post("/api/chat", {**body, "stream": False, "top_logprobs": 0})).json()
    assert len(whole["logprobs"]) == len(chunks)
    assert "top_logprobs" not in whole["logprobs"][0]
    assert list(whole)[5] == "logprobs"


@pytest_twisted.ensureDeferred
async def test_format_json_and_schema(ollama: Served) -> None:
    body = {"model": "llama3.2", "messages": HELLO, "stream": False}
    as_json = (await ollama.post("/api/chat", {**body, "format": "json"})).json()
    assert json.loads(as_json["message"]["content"]) == {"answer": HELLO_ANSWER}
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "location": {"type": "string"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "color": {"type": "string", "enum": ["red", "green"]},
            "pet": {"type": "object", "properties": {"kind": {"type": "string"}}},
        },
        "required": ["name", "age", "extra"],
    }
    structured = (await ollama.post("/api/chat", {**body, "format": schema})).json()
    assert json.loads(structured["message"]["content"]) == {
        "name": "example",
        "location": "Tokyo",
        "age": 1,
        "score": 1,
        "ok": True,
        "tags": ["example"],
        "color": "red",
        "pet": {"kind": "example"},
        "extra": "example",
    }


@pytest_twisted.ensureDeferred
async def test_vision_model_sees_images(ollama: Served) -> None:
    assert len(base64.b64decode(PNG_1X1)) == 68
    two = base64.b64encode(b"x" * 120).decode()
    messages = [
        {"role": "user", "content": "What is this?", "images": [PNG_1X1]},
        {"role": "assistant", "content": "A pixel."},
        {"role": "user", "content": "And these?", "images": [two]},
    ]
    reply = await ollama.post(
        "/api/chat", {"model": "llava", "messages": messages, "stream": False}
    )
    content = reply.json()["message"]["content"]
    assert content.startswith("I see 2 images (68 bytes, 120 bytes). You said: And these.")
    one = [{"role": "user", "content": "Hi", "images": [PNG_1X1]}]
    reply = await ollama.post("/api/chat", {"model": "llava", "messages": one, "stream": False})
    assert "I see 1 image (68 bytes)." in reply.json()["message"]["content"]


@pytest_twisted.ensureDeferred
async def test_midstream_error(ollama: Served) -> None:
    reply = await ollama.post("/api/chat", {"model": "broken", "messages": HELLO})
    assert (reply.code, reply.header(b"content-type")) == (200, NDJSON_TYPE)
    *chunks, last = reply.lines()
    assert len(chunks) == 3 and all(c["done"] is False for c in chunks)
    assert last == {"error": BROKEN_ERROR}
    await ollama.error(
        "/api/chat", {"model": "broken", "messages": HELLO, "stream": False}, 500, BROKEN_ERROR
    )
    stats = ollama.fake.stats
    assert (stats.started, stats.failed, stats.completed, stats.in_flight) == (2, 2, 0, 0)


@pytest_twisted.ensureDeferred
async def test_fail_next(ollama: Served) -> None:
    busy = "server busy, please try again.  maximum pending requests exceeded"
    ollama.fake.fail_next(503, busy)
    ollama.fake.fail_next(500, "out of memory")
    await ollama.error("/api/chat", {"model": "llama3.2", "messages": HELLO}, 503, busy)
    await ollama.error("/api/generate", {"model": "llama3.2", "prompt": "x"}, 500, "out of memory")
    assert (await ollama.post("/api/chat", {"model": "llama3.2", "messages": HELLO})).code == 200


@pytest_twisted.ensureDeferred
async def test_one_model_can_crash_while_the_others_answer(ollama: Served) -> None:
    ollama.fake.fail_model("llama3.2")
    for _ in range(2):  # a crashed runner keeps failing, with Ollama's own words
        await ollama.error("/api/chat", {"model": "llama3.2", "messages": HELLO}, 500, CRASH_ERROR)
    await ollama.error(
        "/api/generate", {"model": "llama3.2:latest", "prompt": "x"}, 500, CRASH_ERROR
    )
    assert (await ollama.post("/api/chat", {"model": "qwen3", "messages": HELLO})).code == 200
    listed = (await ollama.call("GET", "/api/tags")).json()["models"]
    assert "llama3.2:latest" in [m["name"] for m in listed]  # still installed
    # The same over HTTP, for a fake in another process.
    mended = await ollama.post("/_fake/fail", {"model": "llama3.2", "error": None})
    assert mended.code == 200
    assert (await ollama.post("/api/chat", {"model": "llama3.2", "messages": HELLO})).code == 200
    assert (await ollama.post("/_fake/fail", {"model": "qwen3", "error": "boom"})).code == 200
    await ollama.error("/api/chat", {"model": "qwen3", "messages": HELLO}, 500, "boom")
    assert (await ollama.post("/_fake/fail", {"status": 503, "message": "busy"})).code == 200
    await ollama.error("/api/chat", {"model": "llama3.2", "messages": HELLO}, 503, "busy")
    await ollama.error("/_fake/fail", {"model": "nope"}, 404, 'model "nope" not found')
    await ollama.error(
        "/_fake/fail", {"status": "x"}, 400, 'expected {"model", "error"} or {"status", "message"}'
    )
    seen = (await ollama.call("GET", "/_fake/requests")).json()["requests"]
    assert [r["model"] for r in seen if r["path"] == "/api/chat"] == [
        "llama3.2",
        "llama3.2",
        "qwen3",
        "llama3.2",
        "qwen3",
        "llama3.2",
    ]
    await ollama.post("/_fake/reset")
    assert (await ollama.post("/api/chat", {"model": "qwen3", "messages": HELLO})).code == 200


# --------------------------------------------------------------------------
# /api/generate


@pytest_twisted.ensureDeferred
async def test_generate_streams(ollama: Served) -> None:
    reply = await ollama.post("/api/generate", {"model": "llama3.2", "prompt": "Tell me a joke"})
    assert reply.header(b"content-type") == NDJSON_TYPE
    *chunks, final = reply.lines()
    for chunk in chunks:
        assert list(chunk) == ["model", "created_at", "response", "done"]
    assert "".join(c["response"] for c in chunks) == (
        "You said: Tell me a joke. This is a fake answer from llama3.2."
    )
    assert list(final)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
    assert list(final)[6:] == METRICS
    assert final["response"] == ""
    assert all(isinstance(i, int) for i in final["context"])
    assert final["prompt_eval_count"] == 4


@pytest_twisted.ensureDeferred
async def test_generate_without_streaming_and_raw(ollama: Served) -> None:
    body = {"model": "qwen3", "prompt": "Hi there", "stream": False}
    whole = (await ollama.post("/api/generate", body)).json()
    assert list(whole)[:7] == [
        "model",
        "created_at",
        "response",
        "thinking",
        "done",
        "done_reason",
        "context",
    ]
    assert whole["thinking"] == "The user wrote: Hi there. I should answer briefly."
    assert whole["response"] == "You said: Hi there. This is a fake answer from qwen3."
    raw = (await ollama.post("/api/generate", {**body, "raw": True, "think": False})).json()
    assert "context" not in raw and "thinking" not in raw
    context = (await ollama.post("/api/generate", {**body, "context": [1, 2, 3]})).json()
    assert context["context"][:3] == [1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_generate_thinking_chunks_are_top_level(ollama: Served) -> None:
    *chunks, _ = (await ollama.post("/api/generate", {"model": "qwen3", "prompt": "Hi"})).lines()
    assert list(chunks[0]) == ["model", "created_at", "response", "thinking", "done"]
    assert chunks[0]["response"] == ""


@pytest_twisted.ensureDeferred
async def test_generate_suffix_and_load(ollama: Served) -> None:
    body = {
        "model": "qwen2.5-coder",
        "prompt": "def add(a, b):",
        "suffix": "return c",
        "stream": False,
    }
    whole = (await ollama.post("/api/generate", body)).json()
    assert "The middle goes before: return c." in whole["response"]
    load = (await ollama.post("/api/generate", {"model": "llama3.2"})).json()
    assert list(load) == ["model", "created_at", "response", "done", "done_reason"]
    assert (load["response"], load["done_reason"]) == ("", "load")
    unload = (await ollama.post("/api/generate", {"model": "llama3.2", "keep_alive": "0"})).json()
    assert unload["done_reason"] == "unload"


GENERATE_ERRORS: list[tuple[Any, int, str]] = [
    ({"prompt": "x"}, 404, "model '' not found"),
    ({"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
    ({"model": "all-minilm", "prompt": "x"}, 400, '"all-minilm" does not support generate'),
    (
        {"model": "llama3.2", "prompt": "x", "suffix": "y"},
        400,
        "registry.ollama.ai/library/llama3.2:latest does not support insert",
    ),
    (
        {"model": "llama3.2", "prompt": "x", "raw": True, "system": "s"},
        400,
        "raw mode does not support template, system, or context",
    ),
    (
        {"model": "llama3.2", "prompt": "x", "think": "medium"},
        400,
        '"llama3.2" does not support thinking',
    ),
    (
        {"model": "llama3.2", "prompt": "x", "images": ["data:image/png;base64,AAAA"]},
        400,
        "illegal base64 data at input byte 4",
    ),
    (
        {"model": "llama3.2", "prompt": "x", "context": ["a"]},
        400,
        "json: cannot unmarshal string into Go struct field GenerateRequest.context of type int",
    ),
    (
        {"model": "llama3.2", "prompt": "x", "top_logprobs": 1.5},
        400,
        "json: cannot unmarshal number 1.5 into Go struct field"
        " GenerateRequest.top_logprobs of type int",
    ),
    ({"model": "crash", "prompt": "x"}, 500, CRASH_ERROR),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("body", "status", "message"), GENERATE_ERRORS)
async def test_generate_errors(ollama: Served, body: Any, status: int, message: str) -> None:
    await ollama.error("/api/generate", body, status, message)


# --------------------------------------------------------------------------
# Embeddings


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


@pytest_twisted.ensureDeferred
async def test_embed(ollama: Served) -> None:
    reply = await ollama.post("/api/embed", {"model": "all-minilm", "input": ["one two", "three"]})
    answer = reply.json()
    assert list(answer) == [
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    ]
    assert answer["model"] == "all-minilm"
    first, second = answer["embeddings"]
    assert len(first) == len(second) == 384
    assert abs(norm(first) - 1) < 1e-5
    assert first == embed_vector("one two", 384)
    assert second == embed_vector("three", 384)
    assert answer["prompt_eval_count"] == 3
    single = (await ollama.post("/api/embed", {"model": "all-minilm", "input": "one two"})).json()
    assert single["embeddings"] == [first]


@pytest_twisted.ensureDeferred
async def test_embed_dimensions_and_float32(ollama: Served) -> None:
    body = {"model": "all-minilm", "input": "hello", "dimensions": 64}
    reply = await ollama.post("/api/embed", body)
    [vector] = reply.json()["embeddings"]
    assert len(vector) == 64
    assert abs(norm(vector) - 1) < 1e-5
    full = embed_vector("hello", 384)
    assert vector != full[:64]
    # float32 values print in their shortest form (at most 9 significant digits)
    numbers = re.findall(rb"-?\d\.\d+(?:e-?\d+)?", reply.body)
    assert all(len(n.lstrip(b"-").replace(b"0.", b"", 1).lstrip(b"0")) <= 10 for n in numbers)


@pytest_twisted.ensureDeferred
async def test_embed_edge_cases(ollama: Served) -> None:
    empty = await ollama.post("/api/embed", {"model": "all-minilm", "input": ""})
    assert empty.body == b'{"model":"all-minilm","embeddings":[]}'
    missing = await ollama.post("/api/embed", {"model": "all-minilm"})
    assert missing.json() == {"model": "all-minilm", "embeddings": []}
    chat_model = (await ollama.post("/api/embed", {"model": "llama3.2", "input": "x"})).json()
    assert len(chat_model["embeddings"][0]) == 3072


EMBED_ERRORS: list[tuple[str, Any, int, str]] = [
    ("/api/embed", {"model": "all-minilm", "input": [1, 2]}, 400, "invalid input type"),
    ("/api/embed", {"model": "all-minilm", "input": [["a"]]}, 400, "invalid input type"),
    ("/api/embed", {"model": "all-minilm", "input": 5}, 400, "invalid input type"),
    (
        "/api/embed",
        {"model": "nope", "input": "x"},
        404,
        'model "nope" not found, try pulling it first',
    ),
    ("/api/embed", {"input": "x"}, 404, "model '' not found"),
    (
        "/api/embed",
        {"model": "all-minilm", "input": "x", "options": {"num_ctx": "big"}},
        500,
        'option "num_ctx" must be of type integer',
    ),
    (
        "/api/embed",
        {"model": "all-minilm", "input": "word " * 600, "truncate": False},
        400,
        "the input length exceeds the context length",
    ),
    ("/api/embed", b"", 400, "missing request body"),
    ("/api/embeddings", {"prompt": "x"}, 400, "model is required"),
    (
        "/api/embeddings",
        {"model": "nope", "prompt": "x"},
        404,
        'model "nope" not found, try pulling it first',
    ),
    ("/api/embeddings", {"model": "crash", "prompt": "x"}, 500, CRASH_ERROR),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("path", "body", "status", "message"), EMBED_ERRORS)
async def test_embedding_errors(
    ollama: Served, path: str, body: Any, status: int, message: str
) -> None:
    if isinstance(body, bytes):
        await ollama.error(path, None, status, message, raw=body)
    else:
        await ollama.error(path, body, status, message)


@pytest_twisted.ensureDeferred
async def test_legacy_embeddings(ollama: Served) -> None:
    reply = await ollama.post("/api/embeddings", {"model": "all-minilm", "prompt": "hello"})
    vector = reply.json()["embedding"]
    assert list(reply.json()) == ["embedding"]
    assert vector == raw_embedding("hello", 384)
    assert abs(norm(vector) - 1) > 0.1  # not normalised
    empty = await ollama.post("/api/embeddings", {"model": "all-minilm", "prompt": ""})
    assert empty.body == b'{"embedding":[]}'


# --------------------------------------------------------------------------
# Model management


@pytest_twisted.ensureDeferred
async def test_tags(ollama: Served) -> None:
    reply = await ollama.call("GET", "/api/tags")
    assert reply.header(b"content-type") == JSON_TYPE
    models = reply.json()["models"]
    assert {m["name"] for m in models} >= {
        "llama3.2:latest",
        "qwen3:latest",
        "llava:latest",
        "qwen2.5-coder:latest",
        "all-minilm:latest",
        "slow:latest",
        "stall:latest",
        "broken:latest",
        "crash:latest",
    }
    llama = next(m for m in models if m["name"] == "llama3.2:latest")
    assert list(llama) == [
        "name",
        "model",
        "modified_at",
        "size",
        "digest",
        "details",
        "capabilities",
    ]
    assert list(llama["details"]) == [
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    ]
    assert llama["capabilities"] == ["completion", "tools"]
    assert re.match(r"^[0-9a-f]{64}$", llama["digest"])
    assert all(NANO_ANY.match(m["modified_at"]) for m in models)
    stamps = [FakeModel(name="x", modified_at=m["modified_at"]).modified_ns() for m in models]
    assert stamps == sorted(stamps, reverse=True)
    head = await ollama.call("HEAD", "/api/tags")
    assert (head.code, head.body) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_tags_when_empty(serve: Callable[..., Served]) -> None:
    served = serve(models=[])
    assert (await served.call("GET", "/api/tags")).body == b'{"models":[]}'


@pytest_twisted.ensureDeferred
async def test_show(ollama: Served) -> None:
    reply = await ollama.post("/api/show", {"model": "llama3.2"})
    shown = reply.json()
    assert list(shown) == [
        "modelfile",
        "parameters",
        "template",
        "details",
        "model_info",
        "capabilities",
        "modified_at",
    ]
    assert shown["model_info"] == {
        "general.architecture": "llama",
        "general.parameter_count": 3200000000,
        "llama.context_length": 131072,
        "llama.embedding_length": 3072,
    }
    assert shown["capabilities"] == ["completion", "tools"]
    assert shown["parameters"].startswith("stop" + " " * 27 + '"<|start_header_id|>"')
    assert NANO_ANY.match(shown["modified_at"])
    by_name = (await ollama.post("/api/show", {"name": "qwen3"})).json()
    assert by_name["capabilities"] == ["completion", "tools", "thinking"]
    bert = (await ollama.post("/api/show", {"model": "all-minilm"})).json()
    assert bert["model_info"]["bert.embedding_length"] == 384
    await ollama.error("/api/show", {}, 400, "model is required")
    await ollama.error("/api/show", {"model": "nope"}, 404, "model 'nope' not found")


@pytest_twisted.ensureDeferred
async def test_show_not_found_message_is_normalised_from_0_30(serve: Callable[..., Served]) -> None:
    served = serve(version="0.30.1")
    await served.error("/api/show", {"model": "nope"}, 404, "model 'nope:latest' not found")


@pytest_twisted.ensureDeferred
async def test_ps(serve: Callable[..., Served]) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    served = serve(clock=clock)
    assert (await served.call("GET", "/api/ps")).body == b'{"models":[]}'
    await served.post("/api/chat", {"model": "llama3.2", "messages": HELLO, "keep_alive": "10m"})
    await served.post(
        "/api/embed", {"model": "all-minilm", "input": "x", "options": {"num_ctx": 128}}
    )
    models = (await served.call("GET", "/api/ps")).json()["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest", "all-minilm:latest"]
    llama = models[0]
    assert list(llama) == [
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    ]
    assert llama["expires_at"] == "2023-11-14T22:23:20Z"
    assert (llama["size_vram"], llama["context_length"]) == (llama["size"], 4096)
    assert models[1]["context_length"] == 128
    clock.advance(301)  # all-minilm's default 5m keep-alive is over
    models = (await served.call("GET", "/api/ps")).json()["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest"]
    await served.post("/api/chat", {"model": "llama3.2", "messages": HELLO, "keep_alive": 0})
    assert (await served.call("GET", "/api/ps")).json() == {"models": []}


@pytest_twisted.ensureDeferred
async def test_pull_streams_progress_and_installs(ollama: Served) -> None:
    reply = await ollama.post("/api/pull", {"model": "mistral"})
    assert reply.header(b"content-type") == NDJSON_TYPE
    lines = reply.lines()
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-3:] == [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    layers = [line for line in lines if line["status"].startswith("pulling ") and "digest" in line]
    for line in layers:
        assert list(line)[:3] == ["status", "digest", "total"]
        assert line["status"] == "pulling " + line["digest"][7:19]
        assert re.match(r"^sha256:[0-9a-f]{64}$", line["digest"])
        assert line.get("completed", 1) > 0
    assert layers[-1]["completed"] == layers[-1]["total"]
    tags = (await ollama.call("GET", "/api/tags")).json()["models"]
    assert tags[0]["name"] == "mistral:latest"  # newest first
    whole = await ollama.post("/api/pull", {"name": "mistral", "stream": False})
    assert whole.body == b'{"status":"success"}'


@pytest_twisted.ensureDeferred
async def test_pull_errors(ollama: Served) -> None:
    reply = await ollama.post("/api/pull", {"model": "nonexistent-model"})
    assert reply.code == 200
    assert reply.lines() == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    await ollama.error(
        "/api/pull",
        {"model": "nonexistent-model", "stream": False},
        500,
        "pull model manifest: file does not exist",
    )
    await ollama.error("/api/pull", {"model": "bad name!"}, 400, "invalid model name")
    await ollama.error("/api/pull", {}, 400, "invalid model name")


@pytest_twisted.ensureDeferred
async def test_delete_and_pull_back(ollama: Served) -> None:
    reply = await ollama.call("DELETE", "/api/delete", {"model": "llama3.2"})
    assert (reply.code, reply.body) == (200, b"")
    assert reply.length == 0
    assert reply.header(b"content-type") is None
    again = await ollama.call("DELETE", "/api/delete", {"model": "llama3.2"})
    assert (again.code, again.json()) == (404, {"error": "model 'llama3.2' not found"})
    empty = await ollama.call("DELETE", "/api/delete", {})
    assert (empty.code, empty.json()) == (400, {"error": "model is required"})
    nobody = await ollama.call("DELETE", "/api/delete")
    assert (nobody.code, nobody.json()) == (400, {"error": "missing request body"})
    await ollama.error(
        "/api/chat", {"model": "llama3.2", "messages": HELLO}, 404, "model 'llama3.2' not found"
    )
    await ollama.post("/api/pull", {"model": "llama3.2"})
    restored = (await ollama.post("/api/show", {"model": "llama3.2"})).json()
    assert restored["capabilities"] == ["completion", "tools"]


@pytest_twisted.ensureDeferred
async def test_copy(ollama: Served) -> None:
    reply = await ollama.post("/api/copy", {"source": "llama3.2", "destination": "llama3-backup"})
    assert (reply.code, reply.body) == (200, b"")
    tags = (await ollama.call("GET", "/api/tags")).json()["models"]
    assert tags[0]["name"] == "llama3-backup:latest"
    original = next(m for m in tags if m["name"] == "llama3.2:latest")
    assert tags[0]["digest"] == original["digest"]
    answer = await ollama.post(
        "/api/chat", {"model": "llama3-backup", "messages": HELLO, "stream": False}
    )
    assert answer.json()["message"]["content"].endswith("fake answer from llama3-backup.")
    await ollama.error(
        "/api/copy", {"source": "nope", "destination": "x"}, 404, 'model "nope" not found'
    )
    await ollama.error("/api/copy", {"source": "", "destination": "x"}, 400, 'source "" is invalid')
    await ollama.error(
        "/api/copy",
        {"source": "llama3.2", "destination": "a b"},
        400,
        'destination "a b" is invalid',
    )


PLAIN_JSON = [b"application/json"]  # streamResponse/waitForStream: no charset
MARIO = {"model": "mario", "from": "llama3.2", "system": "You are Mario from Super Mario Bros."}


def layer_status(line: dict[str, Any]) -> tuple[str, str]:
    match = re.match(r"^(using existing|creating new) layer sha256:([0-9a-f]{64})$", line["status"])
    assert match is not None, line
    return match.group(1), match.group(2)


@pytest_twisted.ensureDeferred
async def test_create_from_an_installed_model(ollama: Served) -> None:
    reply = await ollama.post("/api/create", MARIO)
    assert (reply.code, reply.header(b"content-type")) == (200, NDJSON_TYPE)
    lines = reply.lines()
    assert lines[-2:] == [{"status": "writing manifest"}, {"status": "success"}]
    assert all(list(line) == ["status"] for line in lines)
    layers = [layer_status(line) for line in lines[:-2]]
    base = {layer.digest for layer in DEFAULT_MODELS[0].blob_layers()}
    weights, template, params = DEFAULT_MODELS[0].blob_layers()
    # The source's layers, the new system layer, then the (unchanged) params moved last.
    system = hashlib.sha256(MARIO["system"].encode()).hexdigest()
    assert layers == [
        ("using existing", weights.digest),
        ("using existing", template.digest),
        ("creating new", system),
        ("using existing", params.digest),
    ]
    assert {digest for _, digest in layers} - base == {system}

    tags = (await ollama.call("GET", "/api/tags")).json()["models"]
    assert tags[0]["name"] == "mario:latest"  # newest first
    llama = next(m for m in tags if m["name"] == "llama3.2:latest")
    assert tags[0]["digest"] != llama["digest"]
    assert (tags[0]["details"], tags[0]["capabilities"]) == (
        llama["details"],
        ["completion", "tools"],
    )
    assert NANO_ANY.match(tags[0]["modified_at"])
    shown = (await ollama.post("/api/show", {"model": "mario"})).json()
    assert shown["system"] == MARIO["system"]
    assert list(shown)[:5] == ["modelfile", "parameters", "template", "system", "details"]
    assert 'SYSTEM """You are Mario' in shown["modelfile"]
    answer = await ollama.post("/api/chat", {"model": "mario", "messages": HELLO, "stream": False})
    assert answer.json()["message"]["content"].endswith("fake answer from mario.")
    assert ollama.fake.stats.requests[0] == ("/api/create", MARIO)

    # The same again: every blob is on disk now.
    again = (await ollama.post("/api/create", MARIO)).lines()
    assert [layer_status(line)[0] for line in again[:-2]] == ["using existing"] * 4


@pytest_twisted.ensureDeferred
async def test_create_without_streaming_and_with_parameters(ollama: Served) -> None:
    body = {
        "model": "Calm-Llama:v1",
        "from": "llama3.2",
        "template": "{{ .Prompt }}",
        "parameters": {"temperature": 0.2, "stop": ["<|eot_id|>"], "num_ctx": 8192},
        "license": ["MIT", "Apache-2.0"],
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }
    reply = await ollama.post("/api/create", body)
    assert (reply.code, reply.body) == (200, b'{"status":"success"}')
    assert reply.header(b"content-type") == PLAIN_JSON
    shown = (await ollama.post("/api/show", {"model": "calm-llama:V1"})).json()
    assert shown["template"] == "{{ .Prompt }}"
    assert shown["parameters"].split("\n") == [
        "stop" + " " * 27 + '"<|eot_id|>"',
        "temperature" + " " * 20 + "0.2",
        "num_ctx" + " " * 24 + "8192",
    ]
    names = [m["name"] for m in (await ollama.call("GET", "/api/tags")).json()["models"]]
    assert names[0] == "Calm-Llama:v1"
    # Streamed: template, licenses, params and messages are new layers, in that order.
    lines = (await ollama.post("/api/create", {**body, "model": "other", "stream": True})).lines()
    statuses = [layer_status(line) for line in lines[:-2]]
    assert [kind for kind, _ in statuses] == ["using existing"] * 6
    assert statuses[1][1] == hashlib.sha256(b"{{ .Prompt }}").hexdigest()
    assert statuses[2][1] == hashlib.sha256(b"MIT").hexdigest()


@pytest_twisted.ensureDeferred
async def test_create_pulls_a_source_it_does_not_have(ollama: Served) -> None:
    lines = (await ollama.post("/api/create", {"model": "m", "from": "mistral"})).lines()
    pulled = lines.index({"status": "success"})
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[pulled - 2 : pulled] == [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
    ]
    assert [layer_status(line)[0] for line in lines[pulled + 1 : -2]] == ["using existing"] * 3
    assert lines[-1] == {"status": "success"}
    assert "mistral" in ollama.fake.models and "m" in ollama.fake.models


@pytest_twisted.ensureDeferred
async def test_create_errors(ollama: Served) -> None:
    reply = await ollama.post("/api/create", {"model": "m", "from": "nonexistent-model"})
    assert reply.code == 200
    assert reply.lines() == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    whole = await ollama.post(
        "/api/create", {"model": "m", "from": "nonexistent-model", "stream": False}
    )
    assert (whole.code, whole.json()) == (
        500,
        {"error": "pull model manifest: file does not exist"},
    )
    assert whole.header(b"content-type") == PLAIN_JSON
    assert "m" not in ollama.fake.models

    async def refused(body: dict[str, Any], status: int, message: str, plain: bool) -> None:
        for stream in (True, False):
            reply = await ollama.post("/api/create", {**body, "stream": stream})
            assert (reply.code, reply.json()) == (status, {"error": message}), body
            assert reply.header(b"content-type") == (PLAIN_JSON if plain else JSON_TYPE)

    # Before the handler starts: gin's AbortWithStatusJSON, with a charset.
    await refused({}, 400, "invalid model name", plain=False)
    await refused({"model": "a b", "from": "llama3.2"}, 400, "invalid model name", plain=False)
    await refused(
        {"model": "m", "files": {"/abs": "sha256:x"}}, 400, "file path must be relative", False
    )
    await refused({"model": "m", "files": {"a.gguf": ""}}, 400, "invalid digest format", False)
    # In the handler, before any line: streamResponse's error, without one.
    await refused({"model": "m"}, 400, "neither 'from' or 'files' was specified", plain=True)
    await refused({"model": "m", "from": "a b"}, 400, "invalid model name", plain=True)
    await refused({"model": "m", "files": {}}, 400, "unknown type", plain=True)
    template = "template error: template: :2: unclosed action"
    bad = {"model": "m", "from": "llama3.2", "template": "Hi\n{{ .Prompt"}
    await refused(bad, 400, template, plain=True)
    license_error = "json: cannot unmarshal number into Go value of type string"
    await refused({"model": "m", "from": "llama3.2", "license": [1]}, 500, license_error, True)
    gguf = {"model": "m", "files": {"model.gguf": "sha256:" + "ab" * 32}}
    lines = (await ollama.post("/api/create", gguf)).lines()
    missing = "open /root/.ollama/models/blobs/sha256-" + "ab" * 32 + ": no such file or directory"
    assert lines == [{"status": "parsing GGUF"}, {"error": missing}]
    assert "m" not in ollama.fake.models
    await ollama.error("/api/create", None, 400, "missing request body", raw=b"")


@pytest_twisted.ensureDeferred
async def test_push(ollama: Served) -> None:
    await ollama.post("/api/create", MARIO)
    reply = await ollama.post("/api/push", {"model": "mario"})
    assert (reply.code, reply.header(b"content-type")) == (200, NDJSON_TYPE)
    lines = reply.lines()
    assert lines[0] == {"status": "retrieving manifest"}
    assert lines[-2:] == [{"status": "pushing manifest"}, {"status": "success"}]
    blobs = lines[1:-2]
    for line in blobs:
        assert list(line)[:3] == ["status", "digest", "total"]
        assert line["status"] == "pushing " + line["digest"][7:19]
    mario = ollama.fake.models.find("mario")
    assert mario is not None
    digests = [f"sha256:{layer.digest}" for layer in (*mario.blob_layers(), mario.config_layer())]
    assert list(dict.fromkeys(line["digest"] for line in blobs)) == digests
    assert ["completed" in line for line in blobs[:3]] == [False, True, True]
    assert blobs[2]["completed"] == blobs[2]["total"]
    # The registry has every blob now: one complete line each.
    again = (await ollama.post("/api/push", {"name": "mario", "stream": True})).lines()
    assert [line.get("completed") for line in again[1:-2]] == [
        line["total"] for line in again[1:-2]
    ]
    whole = await ollama.post("/api/push", {"model": "mario", "stream": False})
    assert (whole.code, whole.body) == (200, b'{"status":"success"}')
    assert whole.header(b"content-type") == PLAIN_JSON


@pytest_twisted.ensureDeferred
async def test_push_errors(ollama: Served) -> None:
    missing = (
        "open /root/.ollama/models/manifests/registry.ollama.ai/library/nope/latest: "
        "no such file or directory"
    )
    reply = await ollama.post("/api/push", {"model": "nope"})
    assert reply.code == 200
    assert reply.lines() == [
        {"status": "retrieving manifest"},
        {"status": "couldn't retrieve manifest"},
        {"error": missing},
    ]
    whole = await ollama.post("/api/push", {"model": "nope", "stream": False})
    assert (whole.code, whole.json()) == (500, {"error": missing})
    assert whole.header(b"content-type") == PLAIN_JSON
    bad = (await ollama.post("/api/push", {"model": "a b"})).lines()
    assert bad[-1] == {"error": "unqualified name: registry.ollama.ai/library/a b:latest"}
    await ollama.error("/api/push", {}, 400, "model is required")
    await ollama.error(
        "/api/push",
        {"model": 3},
        400,
        ("json: cannot unmarshal number into Go struct field PushRequest.model of type string"),
    )


@pytest_twisted.ensureDeferred
async def test_create_is_paced_by_the_clock_and_stops_with_the_client(
    serve: Callable[..., Served],
) -> None:
    clock = Clock()
    served = serve(clock=clock, token_delay=0.06)
    client = await raw_post(served, "/api/create", MARIO)
    await eventually(lambda: len(served.fake.stats.requests) == 1)
    assert client.data == b""
    clock.advance(0.06)
    await eventually(lambda: client.count(b"using existing") == 1)
    clock.advance(0.06 * 4)  # three more layers and writing manifest
    await eventually(lambda: client.count(b"writing manifest") == 1)
    assert "mario" not in served.fake.models
    clock.advance(0.06)
    await eventually(lambda: client.count(b'"success"') == 1)
    assert "mario" in served.fake.models
    client.transport.loseConnection()
    await client.closed

    left = await raw_post(served, "/api/create", {**MARIO, "model": "luigi"})
    await eventually(lambda: len(served.fake.stats.requests) == 2)
    clock.advance(0.06)
    await eventually(lambda: left.count(b"using existing") == 1)
    left.transport.loseConnection()
    await left.closed
    await eventually(lambda: clock.getDelayedCalls() == [])  # the fake saw it go
    clock.advance(1.0)
    assert "luigi" not in served.fake.models


# --------------------------------------------------------------------------
# Fake-only routes


@pytest_twisted.ensureDeferred
async def test_stats_count_the_tokens_the_answers_report(ollama: Served) -> None:
    chat = {"model": "llama3.2", "messages": HELLO, "stream": False}
    said = (await ollama.post("/api/chat", chat)).json()
    again = (await ollama.post("/api/chat", {**chat, "stream": True})).lines()[-1]
    prompt = {"model": "qwen3", "prompt": "why is the sky blue", "think": True, "stream": False}
    generated = (await ollama.post("/api/generate", prompt)).json()
    embedded = await ollama.post("/api/embed", {"model": "all-minilm", "input": ["a b", "c"]})
    await ollama.post("/api/chat", {"model": "broken", "messages": HELLO})
    await ollama.post("/api/embeddings", {"model": "all-minilm", "prompt": "no count"})
    stats = (await ollama.call("GET", "/_fake/stats")).json()
    by_model = {
        "llama3.2": {
            "prompt_tokens": said["prompt_eval_count"] + again["prompt_eval_count"],
            "completion_tokens": said["eval_count"] + again["eval_count"],
        },
        "qwen3": {
            "prompt_tokens": generated["prompt_eval_count"],
            "completion_tokens": generated["eval_count"],
        },
        "all-minilm": {
            "prompt_tokens": embedded.json()["prompt_eval_count"],
            "completion_tokens": 0,
        },
    }
    assert stats["tokens_by_model"] == by_model
    assert stats["prompt_tokens"] == sum(m["prompt_tokens"] for m in by_model.values())
    assert stats["completion_tokens"] == sum(m["completion_tokens"] for m in by_model.values())
    assert stats["completion_tokens"] > 0
    assert stats["failed"] == 1


@pytest_twisted.ensureDeferred
async def test_fake_stats_and_reset(ollama: Served) -> None:
    chat = (await ollama.post("/api/chat", {"model": "llama3.2", "messages": HELLO})).lines()[-1]
    await ollama.call("DELETE", "/api/delete", {"model": "qwen3"})
    ollama.fake.fail_next(503, "busy")
    stats = (await ollama.call("GET", "/_fake/stats")).json()
    prompt, completion = chat["prompt_eval_count"], chat["eval_count"]
    assert stats == {
        "started": 1,
        "completed": 1,
        "aborted": 0,
        "failed": 0,
        "in_flight": 0,
        "requests": 2,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "tokens_by_model": {"llama3.2": {"prompt_tokens": prompt, "completion_tokens": completion}},
    }
    assert [path for path, _ in ollama.fake.stats.requests] == ["/api/chat", "/api/delete"]
    reset = await ollama.post("/_fake/reset")
    assert reset.code == 200
    assert ollama.fake.stats.started == 0 and ollama.fake.stats.requests == []
    assert ollama.fake.stats.tokens == {}
    assert (await ollama.post("/api/show", {"model": "qwen3"})).code == 200
    assert (await ollama.call("GET", "/api/ps")).json() == {"models": []}
    assert (await ollama.post("/api/chat", {"model": "llama3.2", "messages": HELLO})).code == 200


# --------------------------------------------------------------------------
# Pacing and cancellation


@pytest_twisted.ensureDeferred
async def test_clock_drives_the_stream(serve: Callable[..., Served]) -> None:
    clock = Clock()
    served = serve(clock=clock, token_delay=1.0)
    client = await raw_post(served, "/api/chat", {"model": "llama3.2", "messages": HELLO})
    await eventually(lambda: served.fake.stats.started == 1)
    await deferLater(reactor, 0.05, lambda: None)
    assert client.data == b""  # nothing before the first token, not even headers
    clock.advance(1.0)
    await eventually(lambda: client.count(b'"done":false') == 1)
    assert b"application/x-ndjson" in client.data
    assert b'"created_at":"1970-01-01T00:00:01Z"' in client.data
    for _ in range(len(HELLO_ANSWER.split())):
        clock.advance(1.0)
    await eventually(lambda: b'"done":true' in client.data)
    assert b'"created_at":"1970-01-01T00:00:14Z"' in client.data
    assert clock.getDelayedCalls() == []
    client.transport.loseConnection()
    await client.closed
    assert served.fake.stats.completed == 1


@pytest_twisted.ensureDeferred
async def test_client_disconnect_aborts_generation(serve: Callable[..., Served]) -> None:
    clock = Clock()
    served = serve(clock=clock)
    client = await raw_post(served, "/api/chat", {"model": "slow", "messages": HELLO})
    await eventually(lambda: served.fake.stats.started == 1)
    for _ in range(3):
        clock.advance(0.05)  # the slow model's own delay, even with token_delay 0
    await eventually(lambda: client.count(b'"done":false') == 3)
    assert served.fake.stats.in_flight == 1
    assert served.fake.pending_timers() == 1
    client.transport.abortConnection()
    await client.closed
    await eventually(lambda: served.fake.stats.aborted == 1)
    assert clock.getDelayedCalls() == []
    assert served.fake.pending_timers() == 0
    writes = len(served.writes)
    clock.advance(10)
    assert len(served.writes) == writes == 3
    assert not any(gone for _, gone in served.writes)
    stats = served.fake.stats
    assert (stats.started, stats.completed, stats.aborted, stats.in_flight) == (1, 0, 1, 0)
    assert stats.tokens == {}  # no usage was reported


@pytest_twisted.ensureDeferred
async def test_slow_model_abort_on_the_real_reactor(ollama: Served) -> None:
    client = await raw_post(ollama, "/api/generate", {"model": "slow", "prompt": "go"})
    await eventually(lambda: client.count(b'"done":false') >= 2)
    client.transport.abortConnection()
    await client.closed
    await eventually(lambda: ollama.fake.stats.aborted == 1)
    writes = len(ollama.writes)
    await deferLater(reactor, 0.15, lambda: None)
    assert len(ollama.writes) == writes
    assert ollama.fake.stats.in_flight == 0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("stream", [True, False])
async def test_stall_sends_nothing_until_cancelled(ollama: Served, stream: bool) -> None:
    body = {"model": "stall", "messages": HELLO, "stream": stream}
    client = await raw_post(ollama, "/api/chat", body)
    await eventually(lambda: ollama.fake.stats.in_flight == 1)
    await deferLater(reactor, 0.1, lambda: None)
    assert client.data == b""
    client.transport.abortConnection()
    await client.closed
    await eventually(lambda: ollama.fake.stats.aborted == 1)
    assert ollama.writes == []
    assert ollama.fake.stats.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_non_streaming_generation_is_paced_too(serve: Callable[..., Served]) -> None:
    clock = Clock()
    served = serve(clock=clock, token_delay=0.5)
    pending = ensure(
        served.post("/api/chat", {"model": "llama3.2", "messages": HELLO, "stream": False})
    )
    await eventually(lambda: served.fake.stats.started == 1)
    clock.advance(0.5 * 13)
    await deferLater(reactor, 0.05, lambda: None)
    assert not pending.called
    clock.advance(0.5)
    reply = await pending
    answer = reply.json()
    assert answer["message"]["content"] == HELLO_ANSWER
    assert answer["eval_duration"] >= 7_000_000_000


def ensure(coro: Awaitable[Reply]) -> Deferred[Reply]:
    return Deferred.fromCoroutine(coro)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Running it


def test_tap_options_and_service() -> None:
    options = Options()
    options.parseOptions(
        ["--listen", "tcp:0:interface=127.0.0.1", "--token-delay", "0.25", "--host-check"]
    )
    assert options["listen"] == "tcp:0:interface=127.0.0.1"
    assert options["token-delay"] == 0.25
    assert options["host_check"] is True
    defaults = Options()
    defaults.parseOptions([])
    assert defaults["listen"] == "tcp:11434:interface=127.0.0.1"
    assert defaults["host_check"] is False
    service = makeService(options)
    assert service is not None


@pytest_twisted.ensureDeferred
async def test_tap_service_serves(ollama: Served) -> None:
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    service = makeService(options)
    service.startService()
    try:
        port = await service._waitingForPort  # type: ignore[attr-defined]
        response = await treq.get(
            f"http://127.0.0.1:{port.getHost().port}/", agent=Agent(reactor, pool=ollama.pool)
        )
        assert await treq.content(response) == b"Ollama is running"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_tap_stats_file_holds_the_final_counters(ollama: Served, tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--stats-file", str(stats_file)])
    service = makeService(options)
    service.startService()
    port = (await service._waitingForPort).getHost().port  # type: ignore[attr-defined]
    response = await treq.post(
        f"http://127.0.0.1:{port}/api/chat",
        json.dumps({"model": "llama3.2", "messages": HELLO, "stream": False}).encode(),
        agent=Agent(reactor, pool=ollama.pool),
    )
    answer = json.loads(await treq.content(response))
    streaming = await raw_post(port, "/api/chat", {"model": "slow", "messages": HELLO})
    await eventually(lambda: streaming.count(b'"done":false') >= 1)
    assert not stats_file.exists()
    await service.stopService()
    await streaming.closed  # a stopped server leaves no stream running
    counters = json.loads(stats_file.read_text())
    assert (counters["started"], counters["completed"], counters["aborted"]) == (2, 1, 1)
    assert counters["in_flight"] == 0
    assert counters["prompt_tokens"] == answer["prompt_eval_count"]
    assert counters["completion_tokens"] == answer["eval_count"]


def test_earlier_module_names_still_work() -> None:
    from oproxy import service_makers
    from oproxy.testing import fake_models, fake_ollama, fake_ollama_tap, ollama
    from oproxy.testing.ollama import models, tap

    assert fake_ollama.FakeOllama is ollama.FakeOllama is FakeOllama
    assert fake_ollama.main is tap.main
    assert (fake_ollama_tap.Options, fake_ollama_tap.makeService) == (Options, makeService)
    assert fake_models.COLD_LOAD_SECONDS == models.COLD_LOAD_SECONDS
    assert fake_models.DEFAULT_MODELS is DEFAULT_MODELS
    assert service_makers.oproxyFakeOllama.module == "oproxy.testing.ollama.tap"


class ServerProcess(ProcessProtocol):
    """
    ``python -m oproxy.testing.ollama`` (or its earlier name) as a child process.
    """

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


@pytest.mark.parametrize("module", ["oproxy.testing.ollama", "oproxy.testing.fake_ollama"])
@pytest_twisted.ensureDeferred
async def test_module_main_prints_one_line(ollama: Served, module: str) -> None:
    child = ServerProcess()
    argv = [sys.executable, "-m", module, "--port", "0"]
    reactor.spawnProcess(child, sys.executable, argv, env=dict(os.environ))
    try:
        line = await child.first_line
        match = re.match(r"^fake ollama listening on (http://127\.0\.0\.1:\d+)$", line)
        assert match, line
        response = await treq.get(
            match.group(1) + "/api/version", agent=Agent(reactor, pool=ollama.pool)
        )
        assert await treq.content(response) == b'{"version":"0.12.6"}'
    finally:
        child.transport.signalProcess("TERM")
        await child.ended
    assert child.out == line.encode() + b"\n"
    assert child.err == b""


def test_default_catalogue() -> None:
    names = {model.name: model for model in DEFAULT_MODELS}
    assert names["qwen3:latest"].has("thinking")
    assert names["all-minilm:latest"].embedding_length == 384
    assert names["slow:latest"].answer_tokens >= 2000
    assert names["slow:latest"].min_token_delay >= 0.05
