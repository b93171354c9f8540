"""
Keep-alive comments while a model loads: the relay's timers on a test
clock, the cold fake model, and the whole path through the proxy.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from oproxy.config import ConfigError, StreamingConfig, Timeouts, parse_config
from oproxy.errors import ModelNotFound, OProxyError, UpstreamError, UpstreamTimeout
from oproxy.streaming import DONE, KEEPALIVE, relay_sse_with_keepalive, sse_event
from oproxy.testing import FakeOllama
from oproxy.testing.ollama import COLD_LOAD_SECONDS
from tests.conftest import Proxy, listen
from tests.httputil import post_json, raw_post, sse_events
from tests.openai_schema import assert_valid, assert_valid_sse
from tests.test_failures import error_of, wait_until

HELLO = [{"role": "user", "content": "hi"}]
SECOND = 1_000_000_000

# --------------------------------------------------------------------------
# The relay's timers, on a test clock


class RecordingRequest:
    """
    The part of a request the relay uses, noting when each write happened
    and whether the event-stream headers were set by then.
    """

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.responseHeaders = Headers()
        self.writes: list[tuple[float, bytes, bool]] = []
        self.producer: Any = None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def write(self, data: bytes) -> None:
        committed = self.responseHeaders.hasHeader(b"content-type")
        self.writes.append((self.clock.seconds(), data, committed))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def data(self) -> list[bytes]:
        return [data for _, data, _ in self.writes]

    @property
    def times(self) -> list[float]:
        return [when for when, _, _ in self.writes]


END = object()


@dataclass
class ControlledUpstream:
    """
    An upstream the test releases step by step: ``answered`` is the wait
    for its headers (where a model load goes), ``lines`` its chunks.
    Like the fake Ollama, it counts the generations it was made to abort.
    """

    answered: Deferred[None] = field(init=False)
    lines: DeferredQueue[Any] = field(default_factory=DeferredQueue)
    aborted: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        self.answered = Deferred(self._abort)

    def _abort(self, _: Deferred[None]) -> None:
        self.aborted += 1

    async def open(self) -> AsyncGenerator[Any, None]:
        await self.answered
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[Any, None]:
        try:
            while (item := await self.lines.get()) is not END:
                if isinstance(item, Exception):
                    raise item
                yield item
        except CancelledError:
            self.aborted += 1
            raise
        finally:
            self.closed = True


@dataclass
class Relay:
    clock: task.Clock
    request: RecordingRequest
    upstream: ControlledUpstream
    running: Deferred[None]

    def settle(self) -> None:
        """Let the relay's flushes (zero-delay timers) run."""
        for _ in range(4):
            self.clock.advance(0)

    def outcome(self) -> Any:
        results: list[Any] = []
        self.running.addBoth(results.append)
        assert results, "the relay has not finished"
        return results[0]


@pytest.fixture
def relay() -> Relay:
    clock = task.Clock()
    request = RecordingRequest(clock)
    upstream = ControlledUpstream()
    running = Deferred.fromCoroutine(
        relay_sse_with_keepalive(
            cast(IRequest, request), upstream.open, clock, after=2.0, interval=4.0
        )
    )
    return Relay(clock, request, upstream, running)


def error_event(data: bytes) -> dict[str, Any]:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n"), data
    body = orjson.loads(data[6:])
    assert_valid("ErrorResponse", body)
    error: dict[str, Any] = body["error"]
    return error


def test_a_quick_first_chunk_gets_no_keepalive(relay: Relay) -> None:
    relay.clock.advance(1.9)
    relay.upstream.answered.callback(None)
    relay.upstream.lines.put({"n": 1})
    relay.settle()
    relay.upstream.lines.put(END)
    relay.settle()
    assert relay.outcome() is None
    assert relay.request.data == [sse_event({"n": 1}), DONE]
    assert relay.request.times == [1.9, 1.9]
    assert relay.clock.getDelayedCalls() == []
    relay.clock.advance(60)
    assert len(relay.request.writes) == 2


def test_keepalives_every_interval_after_the_first_wait(relay: Relay) -> None:
    relay.clock.advance(1.99)
    assert relay.request.writes == []
    relay.clock.advance(0.01)
    assert relay.request.writes == [(2.0, KEEPALIVE, True)]  # committed with the first
    assert relay.request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/event-stream; charset=utf-8"
    ]
    relay.clock.advance(4)
    relay.clock.advance(4)
    relay.clock.advance(1)
    relay.upstream.answered.callback(None)
    relay.upstream.lines.put({"n": 1})
    relay.settle()
    relay.upstream.lines.put({"n": 2})
    relay.upstream.lines.put(END)
    relay.settle()
    assert relay.outcome() is None
    assert relay.request.data == [
        KEEPALIVE,
        KEEPALIVE,
        KEEPALIVE,
        sse_event({"n": 1}),
        sse_event({"n": 2}),
        DONE,
    ]
    assert relay.request.times == [2.0, 6.0, 10.0, 11.0, 11.0, 11.0]
    assert relay.clock.getDelayedCalls() == []


def test_keepalives_also_cover_a_late_first_chunk_after_the_headers(relay: Relay) -> None:
    relay.clock.advance(0.5)
    relay.upstream.answered.callback(None)  # an OpenAI-style server: headers, then silence
    for step in (1.5, 4, 1.5):  # Clock.advance runs each timer once per call
        relay.clock.advance(step)
    assert relay.request.data == [KEEPALIVE, KEEPALIVE]
    relay.upstream.lines.put({"n": 1})
    relay.upstream.lines.put(END)
    relay.settle()
    assert relay.request.data[2:] == [sse_event({"n": 1}), DONE]


@pytest.mark.parametrize(
    "error", [ModelNotFound("cold"), UpstreamError("backend failed"), RuntimeError("bug")]
)
def test_an_error_before_commit_is_raised_for_an_http_error(relay: Relay, error: Exception) -> None:
    relay.clock.advance(1.5)
    relay.upstream.answered.errback(error)
    outcome = relay.outcome()
    assert isinstance(outcome, Failure) and outcome.value is error
    assert relay.request.writes == []
    assert not relay.request.responseHeaders.hasHeader(b"content-type")
    assert relay.clock.getDelayedCalls() == []


def test_an_empty_stream_before_commit_is_raised(relay: Relay) -> None:
    relay.upstream.answered.callback(None)
    relay.upstream.lines.put(END)
    outcome = relay.outcome()
    assert isinstance(outcome, Failure) and outcome.check(UpstreamError)
    assert relay.request.writes == []


def test_an_error_after_commit_is_an_sse_error_event(relay: Relay) -> None:
    relay.clock.advance(2.5)
    relay.upstream.answered.errback(UpstreamTimeout("backend 'local' did not answer"))
    assert relay.outcome() is None
    assert relay.request.data[0] == KEEPALIVE
    assert len(relay.request.data) == 2
    error = error_event(relay.request.data[1])
    assert error["code"] == "upstream_timeout"
    assert DONE not in relay.request.data
    assert relay.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("error", "code"),
    [(UpstreamError("runner died"), "upstream_error"), (RuntimeError("bug"), None)],
)
def test_a_failing_first_chunk_after_commit_is_an_sse_error_event(
    relay: Relay, error: Exception, code: str | None
) -> None:
    relay.upstream.answered.callback(None)
    relay.clock.advance(3)
    relay.upstream.lines.put(error)
    assert relay.outcome() is None
    event = error_event(relay.request.data[-1])
    if isinstance(error, OProxyError):
        assert event["code"] == error.code == code
    else:
        assert event["type"] == "server_error"
        assert "bug" not in event["message"]
    assert relay.request.data[:-1] == [KEEPALIVE]
    assert relay.upstream.closed


def test_an_empty_stream_after_commit_is_an_sse_error_event(relay: Relay) -> None:
    relay.upstream.answered.callback(None)
    relay.clock.advance(2)
    relay.upstream.lines.put(END)
    assert relay.outcome() is None
    assert "empty" in error_event(relay.request.data[-1])["message"]


def test_cancelling_during_keepalives_aborts_the_upstream(relay: Relay) -> None:
    for step in (2, 4, 0.5):
        relay.clock.advance(step)
    assert relay.request.data == [KEEPALIVE, KEEPALIVE]
    relay.running.cancel()
    outcome = relay.outcome()
    assert isinstance(outcome, Failure) and outcome.check(CancelledError)
    assert relay.upstream.aborted == 1
    assert relay.clock.getDelayedCalls() == []
    relay.clock.advance(60)
    assert len(relay.request.writes) == 2


def test_cancelling_while_the_first_chunk_is_awaited_closes_the_stream(relay: Relay) -> None:
    relay.upstream.answered.callback(None)
    relay.clock.advance(2)
    relay.running.cancel()
    outcome = relay.outcome()
    assert isinstance(outcome, Failure) and outcome.check(CancelledError)
    assert relay.upstream.aborted == 1
    assert relay.upstream.closed
    assert relay.clock.getDelayedCalls() == []


# --------------------------------------------------------------------------
# Configuration


def test_streaming_config_defaults_and_overrides() -> None:
    assert parse_config({}, {}).streaming == StreamingConfig(2.0, 4.0)
    config = parse_config({"streaming": {"keepalive_after": 1, "keepalive_interval": 0.5}}, {})
    assert config.streaming == StreamingConfig(keepalive_after=1.0, keepalive_interval=0.5)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"keepalive_after": 0}, "streaming.keepalive_after"),
        ({"keepalive_interval": "often"}, "streaming.keepalive_interval"),
        ({"keepalive": 5}, "streaming.keepalive"),
    ],
)
def test_streaming_config_errors_name_the_key(section: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_config({"streaming": section}, {})


# --------------------------------------------------------------------------
# The cold fake model


@pytest.fixture
def cold_ollama() -> Iterator[tuple[FakeOllama, task.Clock, str]]:
    clock = task.Clock()
    fake = FakeOllama(clock)
    running = listen(Site(fake.resource()))
    yield fake, clock, running.url
    pytest_twisted.blockon(running.port.stopListening())


def load_duration(raw: bytes) -> int:
    found = re.findall(rb'"load_duration":(\d+)', raw)
    assert len(found) == 1, raw
    return int(found[0])


@pytest_twisted.ensureDeferred
async def test_cold_model_sends_nothing_until_loaded(
    cold_ollama: tuple[FakeOllama, task.Clock, str],
) -> None:
    fake, clock, url = cold_ollama
    client = await raw_post(url, "/api/chat", {"model": "cold", "messages": HELLO})
    await wait_until(lambda: fake.stats.started == 1)
    clock.advance(COLD_LOAD_SECONDS - 0.01)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert client.received == b""  # not even the headers
    clock.advance(0.01)
    await wait_until(lambda: b'"done":true' in client.received)
    assert client.received.startswith(b"HTTP/1.1 200 OK")
    assert load_duration(client.received) == COLD_LOAD_SECONDS * SECOND
    assert [m["name"] for m in orjson.loads(await get(url, "/api/ps"))["models"]] == ["cold:latest"]
    warm = await raw_post(url, "/api/chat", {"model": "cold", "messages": HELLO})
    await wait_until(lambda: b'"done":true' in warm.received)  # no clock advance needed
    assert load_duration(warm.received) < COLD_LOAD_SECONDS * SECOND / 10
    client.transport.loseConnection()
    warm.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_cold_model_requests_during_a_load_wait_for_the_same_load(
    cold_ollama: tuple[FakeOllama, task.Clock, str],
) -> None:
    fake, clock, url = cold_ollama
    first = await raw_post(url, "/api/generate", {"model": "cold", "prompt": "hi"})
    await wait_until(lambda: fake.stats.started == 1)
    clock.advance(0.4)
    second = await raw_post(url, "/api/generate", {"model": "cold", "prompt": "hi"})
    loading = await raw_post(url, "/api/generate", {"model": "cold", "prompt": ""})
    await wait_until(lambda: len(fake.stats.requests) == 3)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert (first.received, second.received, loading.received) == (b"", b"", b"")
    clock.advance(COLD_LOAD_SECONDS - 0.4)
    await wait_until(lambda: b'"done_reason":"load"' in loading.received)
    await wait_until(lambda: b'"done":true' in second.received)
    assert load_duration(first.received) == COLD_LOAD_SECONDS * SECOND
    assert load_duration(second.received) == round((COLD_LOAD_SECONDS - 0.4) * SECOND)
    for client in (first, second, loading):
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_leaving_during_a_load_aborts_the_generation(
    cold_ollama: tuple[FakeOllama, task.Clock, str],
) -> None:
    fake, clock, url = cold_ollama
    client = await raw_post(url, "/api/chat", {"model": "cold", "messages": HELLO})
    await wait_until(lambda: fake.stats.started == 1)
    assert fake.pending_timers() == 1
    client.transport.abortConnection()
    await wait_until(lambda: fake.stats.aborted == 1)
    assert fake.pending_timers() == 0
    clock.advance(COLD_LOAD_SECONDS * 2)
    assert (fake.stats.completed, fake.stats.in_flight) == (0, 0)


async def get(url: str, path: str) -> bytes:
    response = await treq.get(url + path, persistent=False)
    content: bytes = await treq.content(response)
    return content


# --------------------------------------------------------------------------
# Through the proxy, on the real reactor

FAST_KEEPALIVE = StreamingConfig(keepalive_after=0.1, keepalive_interval=0.1)
LOAD = 0.6


def cold_proxy(proxy_factory: Any, **changes: Any) -> Proxy:
    proxy: Proxy = proxy_factory(streaming=FAST_KEEPALIVE, **changes)
    cold = proxy.fake.models.find("cold")
    assert cold is not None
    proxy.fake.models.add(replace(cold, load_delay=LOAD))
    return proxy


def chat_body(model: str, stream: bool = True) -> bytes:
    return orjson.dumps({"model": model, "messages": HELLO, "stream": stream})


@pytest_twisted.ensureDeferred
async def test_loading_comments_come_before_the_first_event(proxy_factory: Any) -> None:
    proxy = cold_proxy(proxy_factory)
    response = await proxy.client.post(
        proxy.v1("chat/completions"),
        data=chat_body("cold"),
        headers={"Content-Type": "application/json"},
    )
    # The headers came while the model was still loading.
    assert response.code == 200
    assert proxy.fake.stats.completed == 0
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    pieces: list[tuple[float, bytes]] = []
    await treq.collect(response, lambda data: pieces.append((reactor.seconds(), data)))
    raw = b"".join(data for _, data in pieces)
    assert raw.startswith(KEEPALIVE)
    assert raw.count(KEEPALIVE) >= 2
    assert raw.rindex(KEEPALIVE) < raw.index(b"data: ")
    first_comment = pieces[0][0]
    first_event = next(when for when, data in pieces if b"data: " in data)
    assert first_event - first_comment >= (LOAD - FAST_KEEPALIVE.keepalive_after) / 2
    # SDK-style parsing skips the comments and finds a valid stream...
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    # ...and without them the bytes are exactly OpenAI's framing.
    events = sse_events(raw.replace(KEEPALIVE, b""))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    _, whole = await post_json(
        proxy.client, proxy.v1("chat/completions"), {"model": "cold", "messages": HELLO}
    )
    assert text == orjson.loads(whole)["choices"][0]["message"]["content"]


@pytest_twisted.ensureDeferred
async def test_a_warm_model_streams_without_comments(proxy_factory: Any) -> None:
    proxy = cold_proxy(proxy_factory)
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "llama3.2", "messages": HELLO, "stream": True},
    )
    assert response.code == 200
    assert raw.startswith(b"data: ") and KEEPALIVE not in raw
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())


@pytest_twisted.ensureDeferred
async def test_errors_before_the_first_comment_stay_http_errors(proxy_factory: Any) -> None:
    proxy = cold_proxy(proxy_factory)
    proxy.fake.fail_next(503, "server busy, please try again.  maximum pending requests exceeded")
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "cold", "messages": HELLO, "stream": True},
    )
    assert response.code == 503
    assert "busy" in error_of(raw)["message"]
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "crash", "messages": HELLO, "stream": True},
    )
    assert response.code == 502
    assert "runner" in error_of(raw)["message"]


@pytest_twisted.ensureDeferred
async def test_a_timeout_during_the_load_is_an_error_event(proxy_factory: Any) -> None:
    proxy = cold_proxy(proxy_factory, timeouts=Timeouts(connect=5, first_byte=0.3))
    response, raw = await post_json(
        proxy.client,
        proxy.v1("chat/completions"),
        {"model": "cold", "messages": HELLO, "stream": True},
    )
    assert response.code == 200
    assert raw.startswith(KEEPALIVE)
    events = sse_events(raw.replace(KEEPALIVE, b""))
    assert len(events) == 1
    assert_valid("ErrorResponse", events[0])
    assert events[0]["error"]["code"] == "upstream_timeout"
    await wait_until(lambda: proxy.fake.stats.aborted == 1)


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_during_the_load_aborts_it(proxy_factory: Any) -> None:
    proxy = cold_proxy(proxy_factory)
    body = {"model": "cold", "messages": HELLO, "stream": True}
    client = await raw_post(proxy.url, "/v1/chat/completions", body)
    await wait_until(lambda: KEEPALIVE in client.received)
    assert b"data: " not in client.received
    client.transport.loseConnection()
    await wait_until(lambda: proxy.fake.stats.aborted == 1)
    assert proxy.fake.stats.completed == 0
    assert proxy.fake.stats.in_flight == 0
