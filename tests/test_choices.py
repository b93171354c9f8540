"""
Several generations in one request: ``n`` choices and prompt lists, their
limits, their bounded concurrency and how they are joined, through the
proxy against the fake Ollama (and the fake OpenAI-compatible server), and
the pieces that run them.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.web.server import Site

from oproxy.api.choices import derived_seed, requested_generations
from oproxy.config import BackendConfig, RequestLimits
from oproxy.streaming import merge
from oproxy.testing import FakeOpenAI, GenerationStats
from oproxy.together import run_bounded
from tests.conftest import Proxy, listen
from tests.httputil import header, post_json, raw_post, sse_events
from tests.openai_schema import assert_valid, assert_valid_sse

HELLO = [{"role": "user", "content": "Why is the sky blue?"}]


class PeakStats(GenerationStats):
    """The fake's counters, remembering the most generations ever in flight at once."""

    peak = 0

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("started", "completed", "aborted", "failed") and "failed" in self.__dict__:
            object.__setattr__(self, "peak", max(self.peak, self.in_flight))


async def post(proxy: Proxy, route: str, **body: Any) -> tuple[Any, Any]:
    body.setdefault("model", "llama3.2")
    if route == "chat/completions":
        body.setdefault("messages", HELLO)
    else:
        body.setdefault("prompt", "Once upon a time")
    response, raw = await post_json(proxy.client, proxy.v1(route), body)
    return response, raw if body.get("stream") else orjson.loads(raw)


def sent(proxy: Proxy, path: str) -> list[dict[str, Any]]:
    return [body for seen, body in proxy.fake.stats.requests if seen == path]


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition never became true")


# --------------------------------------------------------------------------
# Chat


@pytest_twisted.ensureDeferred
async def test_chat_n_choices(proxy: Proxy) -> None:
    _, single = await post(proxy, "chat/completions", seed=7)
    proxy.fake.reset()
    response, body = await post(proxy, "chat/completions", n=3, seed=7)
    assert response.code == 200
    assert_valid("CreateChatCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "stop" for c in body["choices"])
    # The fake answers from the text alone, so the choices are equal here;
    # each generation had its own seed, the first the one the client gave.
    assert body["choices"][0]["message"] == single["choices"][0]["message"]
    natives = sent(proxy, "/api/chat")
    assert sorted(b["options"]["seed"] for b in natives) == [7, 8, 9]
    assert not any("n" in b for b in natives)
    one = single["usage"]
    assert body["usage"] == {key: 3 * value for key, value in one.items()}


@pytest_twisted.ensureDeferred
async def test_chat_n_without_seed_leaves_generations_unseeded(proxy: Proxy) -> None:
    _, body = await post(proxy, "chat/completions", n=2, temperature=0)
    texts = {c["message"]["content"] for c in body["choices"]}
    assert len(body["choices"]) == 2 and len(texts) == 1  # greedy: equal answers
    natives = sent(proxy, "/api/chat")
    assert len(natives) == 2
    assert all("seed" not in b["options"] and b["options"]["temperature"] == 0 for b in natives)


@pytest_twisted.ensureDeferred
async def test_chat_n_streamed(proxy: Proxy) -> None:
    _, whole = await post(proxy, "chat/completions", n=2)
    response, raw = await post(
        proxy, "chat/completions", n=2, stream=True, stream_options={"include_usage": True}
    )
    assert response.code == 200
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    *choices, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in choices)
    for index in (0, 1):
        mine = [c["choices"][0] for c in choices if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        text = "".join(choice["delta"].get("content") or "" for choice in mine)
        assert text == whole["choices"][index]["message"]["content"]
        assert [choice["finish_reason"] for choice in mine][-1] == "stop"
        assert all(choice["finish_reason"] is None for choice in mine[:-1])


@pytest_twisted.ensureDeferred
async def test_chat_n_stream_without_usage_has_no_usage_chunk(proxy: Proxy) -> None:
    _, raw = await post(proxy, "chat/completions", n=2, stream=True)
    chunks = sse_events(raw)[:-1]
    assert all(c["choices"] for c in chunks)
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}


# --------------------------------------------------------------------------
# Completions


@pytest_twisted.ensureDeferred
async def test_completions_index_is_prompt_times_n_plus_choice(proxy: Proxy) -> None:
    prompts = ["alpha beta", "gamma"]
    response, body = await post(proxy, "completions", prompt=prompts, n=2, seed=1)
    assert response.code == 200
    assert_valid("CreateCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    singles = [(await post(proxy, "completions", prompt=p))[1] for p in prompts]
    first, second = (single["choices"][0]["text"] for single in singles)
    assert [c["text"] for c in body["choices"]] == [first, first, second, second]
    usages = [single["usage"] for single in singles]
    assert body["usage"] == {key: 2 * sum(u[key] for u in usages) for key in body["usage"]}
    natives = sent(proxy, "/api/generate")[:4]
    assert sorted((b["prompt"], b["options"]["seed"]) for b in natives) == [
        ("alpha beta", 1),
        ("alpha beta", 2),
        ("gamma", 1),
        ("gamma", 2),
    ]


@pytest_twisted.ensureDeferred
async def test_completions_streamed_with_usage(proxy: Proxy) -> None:
    _, whole = await post(proxy, "completions", prompt=["one", "two words"], n=2)
    _, raw = await post(
        proxy,
        "completions",
        prompt=["one", "two words"],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert_valid_sse("CreateCompletionStreamResponse", raw.decode())
    *chunks, usage = sse_events(raw)[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert len({c["id"] for c in chunks}) == 1
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == "stop"


@pytest_twisted.ensureDeferred
async def test_best_of_must_be_n(proxy: Proxy) -> None:
    response, body = await post(proxy, "completions", n=2, best_of=2)
    assert response.code == 200 and len(body["choices"]) == 2
    assert not any("best_of" in b for b in sent(proxy, "/api/generate"))
    response, body = await post(proxy, "completions", n=2, best_of=1)
    assert (response.code, body["error"]["param"]) == (400, "best_of")
    assert "greater than or equal to n" in body["error"]["message"]
    response, body = await post(proxy, "completions", best_of=3)
    assert (response.code, body["error"]["code"]) == (400, "unsupported_value")


# --------------------------------------------------------------------------
# Limits, checked before anything starts


@pytest.mark.parametrize(
    ("route", "fields", "param", "code", "words"),
    [
        ("chat/completions", {"n": 9}, "n", "integer_above_max_value", "<= 8"),
        ("chat/completions", {"n": 0}, "n", "integer_below_min_value", ">= 1"),
        ("chat/completions", {"n": "2"}, "n", "invalid_type", "integer"),
        ("chat/completions", {"n": 1.5}, "n", "invalid_type", "integer"),
        ("completions", {"n": 9}, "n", "integer_above_max_value", "limits.max_n"),
        ("completions", {"prompt": ["x"] * 65}, "prompt", "array_above_max_length", "64"),
        ("completions", {"prompt": ["x", 3]}, "prompt.1", "invalid_type", "string"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refused_before_any_upstream_call(
    proxy: Proxy, route: str, fields: dict[str, Any], param: str, code: str, words: str
) -> None:
    response, body = await post(proxy, route, **fields)
    assert response.code == 400
    assert_valid("ErrorResponse", body)
    error = body["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert words in error["message"]
    assert proxy.fake.stats.requests == []


@pytest_twisted.ensureDeferred
async def test_limits_come_from_the_config(proxy_factory: Any) -> None:
    proxy = proxy_factory(limits=RequestLimits(max_prompts=3, max_n=2))
    response, body = await post(proxy, "completions", prompt=["a", "b", "c", "d"])
    assert response.code == 400 and "maximum length 3" in body["error"]["message"]
    response, body = await post(proxy, "chat/completions", n=3)
    assert response.code == 400 and "<= 2" in body["error"]["message"]
    assert proxy.fake.stats.requests == []
    response, body = await post(proxy, "completions", prompt=["a", "b", "c"], n=2)
    assert response.code == 200 and len(body["choices"]) == 6


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_long_prompt_list_runs_a_few_at_a_time(proxy: Proxy, stream: bool) -> None:
    proxy.fake.stats = stats = PeakStats()
    prompts = [f"prompt {i}" for i in range(64)]
    response, body = await post(
        proxy, "completions", model="slow", prompt=prompts, max_tokens=2, stream=stream
    )
    assert response.code == 200
    assert stats.started == stats.completed == 64
    assert 1 < stats.peak <= 4
    if stream:
        finished = [c for c in sse_events(body)[:-1] if c["choices"][0]["finish_reason"]]
        assert sorted(c["choices"][0]["index"] for c in finished) == list(range(64))
    else:
        assert [c["index"] for c in body["choices"]] == list(range(64))


@pytest_twisted.ensureDeferred
async def test_concurrency_comes_from_the_config(proxy_factory: Any) -> None:
    proxy = proxy_factory(limits=RequestLimits(generation_concurrency=1))
    proxy.fake.stats = stats = PeakStats()
    response, _ = await post(proxy, "chat/completions", model="slow", n=3, max_tokens=2)
    assert response.code == 200
    assert (stats.completed, stats.peak) == (3, 1)


# --------------------------------------------------------------------------
# Failure and cancellation


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_one_failure_cancels_the_others_and_starts_no_more(
    proxy: Proxy, stream: bool
) -> None:
    proxy.fake.fail_next(500, "boom")
    response, raw = await post_json(
        proxy.client,
        proxy.v1("completions"),
        {"model": "slow", "prompt": [f"p{i}" for i in range(8)], "stream": stream},
    )
    assert response.code == 502, raw
    stats = proxy.fake.stats
    await until(lambda: stats.in_flight == 0 and stats.aborted == stats.started)
    assert stats.completed == 0
    assert len(sent(proxy, "/api/generate")) <= 4  # the rest never started


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_client_leaving_cancels_every_generation(proxy: Proxy, stream: bool) -> None:
    client = await raw_post(
        proxy.url,
        "/v1/chat/completions",
        {"model": "slow", "messages": HELLO, "n": 4, "stream": stream},
    )
    stats = proxy.fake.stats
    if stream:
        await until(lambda: client.received.count(b"data: ") >= 8)
    else:
        await until(lambda: stats.in_flight == 4)
    client.transport.loseConnection()
    await until(lambda: stats.aborted == 4)
    assert (stats.started, stats.completed, stats.in_flight) == (4, 0, 0)


# --------------------------------------------------------------------------
# The cache


@pytest_twisted.ensureDeferred
async def test_several_choices_are_never_cached(proxy: Proxy) -> None:
    for _ in range(2):
        response, body = await post(proxy, "chat/completions", n=2, temperature=0)
        assert header(response, "x-cache") == "BYPASS"
        assert len(body["choices"]) == 2
    assert len(sent(proxy, "/api/chat")) == 4


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_deterministic_prompt_list_is_cached_and_replayed_whole(
    proxy: Proxy, stream: bool
) -> None:
    fields = {"prompt": ["one", "two words", "three"], "temperature": 0, "stream": stream}
    first, first_body = await post(proxy, "completions", **fields)
    second, second_body = await post(proxy, "completions", **fields)
    assert (header(first, "x-cache"), header(second, "x-cache")) == ("MISS", "HIT")
    assert second_body == first_body
    assert len(sent(proxy, "/api/generate")) == 3


# --------------------------------------------------------------------------
# An OpenAI-compatible backend: fanned out the same way


@pytest.fixture
def openai_proxy(proxy_factory: Any) -> Iterator[tuple[Proxy, FakeOpenAI]]:
    fake = FakeOpenAI(reactor)
    running = listen(Site(fake.resource()))
    backend = BackendConfig(name="remote", type="openai", url=running.url)
    proxy: Proxy = proxy_factory(backends=(backend,))
    yield proxy, fake
    pytest_twisted.blockon(running.port.stopListening())


def upstream_bodies(fake: FakeOpenAI, path: str) -> list[dict[str, Any]]:
    return [seen.body for seen in fake.stats.requests if seen.path == path]


@pytest_twisted.ensureDeferred
async def test_openai_backends_get_one_generation_a_call(
    openai_proxy: tuple[Proxy, FakeOpenAI],
) -> None:
    proxy, fake = openai_proxy
    response, body = await post(proxy, "chat/completions", model="gpt-fake", n=2, seed=5)
    assert response.code == 200, body
    assert_valid("CreateChatCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    bodies = upstream_bodies(fake, "/v1/chat/completions")
    assert sorted(b["seed"] for b in bodies) == [5, 6]
    assert not any("n" in b for b in bodies)
    response, body = await post(
        proxy, "completions", model="gpt-fake", prompt=["a b", "c"], n=2, best_of=2
    )
    assert response.code == 200, body
    assert_valid("CreateCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    bodies = upstream_bodies(fake, "/v1/completions")
    assert sorted(b["prompt"] for b in bodies) == ["a b", "a b", "c", "c"]
    assert not any("n" in b or "best_of" in b for b in bodies)
    singles = [
        (await post(proxy, "completions", model="gpt-fake", prompt=p))[1]["usage"]
        for p in ("a b", "c")
    ]
    assert body["usage"]["total_tokens"] == 2 * sum(u["total_tokens"] for u in singles)


@pytest_twisted.ensureDeferred
async def test_openai_backends_streamed(openai_proxy: tuple[Proxy, FakeOpenAI]) -> None:
    proxy, _ = openai_proxy
    _, whole = await post(proxy, "chat/completions", model="gpt-fake", n=2)
    response, raw = await post(
        proxy,
        "chat/completions",
        model="gpt-fake",
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert response.code == 200
    assert_valid_sse("CreateChatCompletionStreamResponse", raw.decode())
    *chunks, usage = sse_events(raw)[:-1]
    assert (
        usage["choices"] == []
        and usage["usage"]["total_tokens"] == (whole["usage"]["total_tokens"])
    )
    assert len({c["id"] for c in chunks}) == 1
    for index in (0, 1):
        text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in chunks
            if c["choices"][0]["index"] == index
        )
        assert text == whole["choices"][index]["message"]["content"]


# --------------------------------------------------------------------------
# The pieces


def test_seeds_wrap_within_64_bits() -> None:
    assert [derived_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert derived_seed(2**63 - 1, 1) == -(2**63)
    assert derived_seed(-1, 2) == 1


def test_generation_bodies() -> None:
    limits = RequestLimits()
    chat = requested_generations("chat", {"n": 2, "seed": 4.0}, limits)
    assert chat.bodies({"n": 2, "seed": 4.0, "messages": []}) == [
        {"seed": 4, "messages": []},
        {"seed": 5, "messages": []},
    ]
    # Ollama's own options.seed counts as the seed when there is no other.
    native = chat.bodies({"n": 2, "options": {"seed": 1, "top_k": 3}})
    assert [b["options"] for b in native] == [{"seed": 1, "top_k": 3}, {"seed": 2, "top_k": 3}]
    assert [b["seed"] for b in chat.bodies({"seed": 9, "options": {"seed": 1}})] == [9, 10]
    # A seed out of range is left for the translation to refuse.
    assert [b["seed"] for b in chat.bodies({"seed": 2**64})] == [2**64, 2**64]
    assert chat.bodies({"seed": "x"}) == [{"seed": "x"}, {"seed": "x"}]
    body = {"prompt": ["a", "b"], "n": 2, "best_of": 2}
    completions = requested_generations("completions", body, limits)
    assert completions.count == 4
    assert completions.bodies(body) == [{"prompt": p} for p in ("a", "a", "b", "b")]
    one = requested_generations("completions", {"prompt": ["a"], "n": 3}, limits)
    assert one.count == 3 and one.bodies({"prompt": ["a"]}) == [{"prompt": ["a"]}] * 3
    assert requested_generations("completions", {"prompt": [1, 2, 3]}, limits).count == 1


async def _items(values: list[int], opened: list[int], closed: list[int], name: int) -> Any:
    opened.append(name)
    try:
        for value in values:
            await task.deferLater(reactor, 0, lambda: None)
            yield value
    finally:
        closed.append(name)


@pytest_twisted.ensureDeferred
async def test_merge_runs_a_bounded_number_at_once() -> None:
    opened: list[int] = []
    closed: list[int] = []
    sources = [_items([i * 10, i * 10 + 1], opened, closed, i) for i in range(6)]
    running_at_most = 0
    seen = []
    async with aclosing(merge(sources, concurrency=2)) as merged:
        async for item in merged:
            seen.append(item)
            running_at_most = max(running_at_most, len(opened) - len(closed))
    assert sorted(seen) == sorted(v for i in range(6) for v in (i * 10, i * 10 + 1))
    assert running_at_most <= 2
    assert sorted(closed) == list(range(6))


@pytest_twisted.ensureDeferred
async def test_closing_a_merge_closes_started_and_waiting_sources() -> None:
    opened: list[int] = []
    closed: list[int] = []
    sources = [_items(list(range(100)), opened, closed, i) for i in range(5)]
    merged = merge(sources, concurrency=2)
    await merged.__anext__()
    await merged.aclose()
    await task.deferLater(reactor, 0, lambda: None)  # the lane that ran us here stops
    assert sorted(opened) == [0, 1]
    assert sorted(closed) == [0, 1]
    # The three never started are closed unstarted: iterating them now ends at once.
    for source in sources[2:]:
        assert [item async for item in source] == []


@pytest_twisted.ensureDeferred
async def test_merge_pulls_a_source_only_when_its_item_was_taken() -> None:
    pulled: list[int] = []

    async def counting(name: int) -> AsyncGenerator[int, None]:
        for value in range(10):
            pulled.append(name)
            yield value

    merged = merge([counting(0), counting(1)])
    await merged.__anext__()
    await task.deferLater(reactor, 0.01, lambda: None)
    # Each source is at most one item ahead of the consumer.
    assert len(pulled) <= 3
    await merged.aclose()


@pytest_twisted.ensureDeferred
async def test_run_bounded_keeps_order_bounds_and_cancels() -> None:
    cancelled: list[int] = []
    gates = [defer.Deferred[int](lambda _, i=i: cancelled.append(i)) for i in range(6)]
    started: list[int] = []

    def work(index: int) -> Any:
        def start() -> defer.Deferred[int]:
            started.append(index)
            return gates[index]

        return start

    ok = defer.Deferred.fromCoroutine(run_bounded([work(i) for i in (0, 1, 2)], 2))
    assert started == [0, 1]
    gates[1].callback(11)
    assert started == [0, 1, 2]
    gates[2].callback(12)
    gates[0].callback(10)
    assert await ok == [10, 11, 12]

    started.clear()
    failing = defer.Deferred.fromCoroutine(run_bounded([work(i) for i in (3, 4, 5)], 2))
    assert started == [3, 4]
    gates[3].errback(RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        await failing
    assert cancelled == [4]  # the one running was cancelled
    assert started == [3, 4]  # and the last never started
