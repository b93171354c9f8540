"""
The response cache: policy and keys (pure), the memory store and the cache
itself on a fake clock.  The Redis store is tested against a real server in
``test_resp.py``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, Awaitable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure

from oproxy.cache import (
    BYPASS,
    HIT,
    MISS,
    CacheControl,
    CachedAnswer,
    CachePolicy,
    MemoryStore,
    RedisStore,
    ResponseCache,
    build_cache,
    cache_key,
    cache_policy,
    is_deterministic,
    parse_cache_control,
    replay,
)
from oproxy.config import CacheConfig

T = TypeVar("T")

CONFIG = CacheConfig()
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def now(awaitable: Awaitable[T]) -> T:
    """Await something that must finish without the reactor (memory store, fake clock)."""

    async def run() -> T:
        return await awaitable

    results: list[Any] = []
    defer.Deferred.fromCoroutine(run()).addBoth(results.append)
    assert results, "it waited on something"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    result: T = results[0]
    return result


def policy_for(
    body: dict[str, Any],
    route: str = "chat",
    *,
    key_name: str | None = "alice",
    cache_control: bytes | None = None,
    config: CacheConfig = CONFIG,
    model: str = "llama3:latest",
    backend: str = "local",
) -> CachePolicy:
    return cache_policy(
        route,
        body,
        model=model,
        backend=backend,
        key_name=key_name,
        cache_control=cache_control,
        config=config,
    )


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- which requests are cacheable ----------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "expected"),
    [
        ("embeddings", {"model": "m", "input": "x"}, True),
        ("embeddings", {"model": "m", "input": "x", "temperature": 1}, True),
        ("chat", {"model": "m"}, False),
        ("chat", {"model": "m", "temperature": 0}, True),
        ("chat", {"model": "m", "temperature": 0.0}, True),
        ("chat", {"model": "m", "temperature": 0.7}, False),
        ("chat", {"model": "m", "temperature": None}, False),
        ("chat", {"model": "m", "temperature": False}, False),
        ("chat", {"model": "m", "temperature": "0"}, False),
        ("chat", {"model": "m", "seed": 42, "temperature": 1.2}, True),
        ("chat", {"model": "m", "seed": 0}, True),
        ("chat", {"model": "m", "seed": None}, False),
        ("chat", {"model": "m", "seed": True}, False),
        ("chat", {"model": "m", "seed": "42"}, False),
        ("chat", {"model": "m", "temperature": 0, "n": 1}, True),
        ("chat", {"model": "m", "temperature": 0, "n": None}, True),
        ("chat", {"model": "m", "temperature": 0, "n": 2}, False),
        ("chat", {"model": "m", "seed": 1, "n": 3}, False),
        ("chat", {"model": "m", "temperature": 0, "n": True}, False),
        ("completions", {"model": "m", "prompt": "x", "temperature": 0}, True),
        ("completions", {"model": "m", "prompt": "x", "seed": 7}, True),
        ("completions", {"model": "m", "prompt": "x"}, False),
        ("models", {"temperature": 0}, False),
    ],
)
def test_is_deterministic(route: str, body: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(route, body) is expected


def test_nondeterministic_requests_bypass() -> None:
    policy = policy_for({"model": "m", "messages": [], "temperature": 0.8})
    assert policy == CachePolicy(key=None, read=False, write=False, max_age=None)


def test_disabled_cache_bypasses() -> None:
    assert policy_for(CHAT, config=CacheConfig(enabled=False)).key is None


def test_deterministic_request_reads_and_writes() -> None:
    policy = policy_for(CHAT, config=CacheConfig(ttl=60))
    assert policy.key is not None and policy.key.startswith("v1:")
    assert len(policy.key) == 3 + 64
    assert (policy.read, policy.write, policy.max_age, policy.ttl) == (True, True, None, 60)


@given(st.floats(min_value=0.001, max_value=2, allow_nan=False), st.none() | st.integers(2, 8))
def test_sampled_requests_always_bypass(temperature: float, n: int | None) -> None:
    body = {**CHAT, "temperature": temperature}
    assert policy_for(body).key is None
    if n is not None:
        assert policy_for({**CHAT, "n": n}).key is None
        assert policy_for({**CHAT, "seed": 3, "n": n}).key is None


# -- keys ----------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(st.text(max_size=8), json_values, max_size=8)


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys in another order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


def key(body: dict[str, Any], **changes: Any) -> str:
    arguments: dict[str, Any] = {"model": "m", "backend": "local", "key_name": "alice"}
    arguments.update(changes)
    route = arguments.pop("route", "chat")
    return cache_key(route, body, **arguments)


@settings(max_examples=50)
@given(bodies, st.randoms(use_true_random=False))
def test_key_is_stable_under_key_order(body: dict[str, Any], rng: random.Random) -> None:
    assert key(shuffled(body, rng)) == key(body)


@settings(max_examples=50)
@given(bodies, st.text(max_size=10), st.text(max_size=10))
def test_callers_get_different_keys_unless_shared(
    body: dict[str, Any], alice: str, bob: str
) -> None:
    if alice != bob:
        assert key(body, key_name=alice) != key(body, key_name=bob)
    assert key(body, key_name=alice) != key(body, key_name=None)
    assert key(body, key_name=alice, shared=True) == key(body, key_name=bob, shared=True)
    assert key(body, key_name=None, shared=True) == key(body, key_name=alice, shared=True)
    # Turning sharing on or off never maps one tenant's entries onto another's.
    assert key(body, key_name=alice, shared=True) not in (
        key(body, key_name=alice),
        key(body, key_name=None),
    )


def test_policy_keys_respect_share_across_keys() -> None:
    alice = policy_for(CHAT, key_name="alice").key
    bob = policy_for(CHAT, key_name="bob").key
    assert alice != bob
    shared = CacheConfig(share_across_keys=True)
    assert policy_for(CHAT, key_name="alice", config=shared).key == (
        policy_for(CHAT, key_name="bob", config=shared).key
    )


@settings(max_examples=50)
@given(
    bodies,
    st.fixed_dictionaries(
        {},
        optional={
            name: json_values
            for name in (
                "user",
                "metadata",
                "store",
                "service_tier",
                "safety_identifier",
                "prompt_cache_key",
            )
        },
    ),
)
def test_bookkeeping_fields_do_not_change_the_key(
    body: dict[str, Any], bookkeeping: dict[str, Any]
) -> None:
    assert key({**body, **bookkeeping}) == key(
        {k: v for k, v in body.items() if k not in bookkeeping}
    )


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.0},  # 0 and 0.0 are not normalised; a miss, never a wrong hit
        {"stream": True},
        {"stream_options": {"include_usage": True}},
        {"model": "llama3:8b"},
        {"messages": [{"role": "user", "content": "hi!"}]},
        {"seed": 1},
        {"max_tokens": 5},
        {"tools": []},
    ],
)
def test_answer_changing_fields_change_the_key(change: dict[str, Any]) -> None:
    assert key({**CHAT, **change}) != key(CHAT)


def test_defaults_spelt_out_are_the_same_request() -> None:
    assert key({**CHAT, "stream": False}) == key(CHAT)
    assert key({**CHAT, "n": 1}) == key(CHAT)
    assert key({**CHAT, "stream": True}) != key(CHAT)


def test_route_model_and_backend_are_in_the_key() -> None:
    base = key(CHAT)
    assert key(CHAT, route="completions") != base
    assert key(CHAT, model="other") != base
    assert key(CHAT, backend="gpu2") != base


def test_unserialisable_body_bypasses() -> None:
    assert policy_for({**CHAT, "extra": 2**70}).key is None


# -- Cache-Control --------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, CacheControl()),
        (b"", CacheControl()),
        (b"no-store", CacheControl(no_store=True)),
        (b"No-Store", CacheControl(no_store=True)),
        (b"no-cache", CacheControl(no_cache=True)),
        (b"max-age=30", CacheControl(max_age=30)),
        (b'max-age="30"', CacheControl(max_age=30)),
        (b"MAX-AGE = 30", CacheControl(max_age=30)),
        (b"no-cache, max-age=0", CacheControl(no_cache=True, max_age=0)),
        (b"max-age=0,no-cache", CacheControl(no_cache=True, max_age=0)),
        (b"max-age=60, max-age=10", CacheControl(max_age=10)),
        (b"max-age=abc", CacheControl(max_age=0)),
        (b"max-age=-5", CacheControl(max_age=0)),
        (b"max-age=1.5", CacheControl(max_age=0)),
        (b"max-age", CacheControl(max_age=0)),
        (b"max-age=99999999999999999999999", CacheControl(max_age=2**31)),
        (b"max-age=\xd9\xa3", CacheControl(max_age=0)),  # not ASCII digits
        (b'foo="a, no-store", max-age=5', CacheControl(max_age=5)),
        (b"private, max-stale=100, only-if-cached", CacheControl()),
        (b",,, ;; ==", CacheControl()),
        (b"no-storex, xno-cache", CacheControl()),
    ],
)
def test_parse_cache_control(header: bytes | None, expected: CacheControl) -> None:
    assert parse_cache_control(header) == expected


@given(st.binary(max_size=200))
def test_parse_cache_control_never_raises(header: bytes) -> None:
    parsed = parse_cache_control(header)
    assert parsed.max_age is None or 0 <= parsed.max_age <= 2**31


@pytest.mark.parametrize(
    ("header", "read", "write", "max_age"),
    [
        (None, True, True, None),
        (b"no-cache", False, True, None),
        (b"no-cache, max-age=0", False, True, 0),
        (b"max-age=0", False, True, 0),
        (b"max-age=junk", False, True, 0),
        (b"max-age=120", True, True, 120),
        (b"no-cache, max-age=120", False, True, 120),
        (b"public, whatever", True, True, None),
    ],
)
def test_policy_follows_cache_control(
    header: bytes, read: bool, write: bool, max_age: float | None
) -> None:
    policy = policy_for(CHAT, cache_control=header)
    assert policy.key is not None
    assert (policy.read, policy.write, policy.max_age) == (read, write, max_age)


@pytest.mark.parametrize(
    "header", [b"no-store", b"no-cache, no-store", b"max-age=60, NO-STORE", b"no-store=x"]
)
def test_no_store_bypasses_entirely(header: bytes) -> None:
    assert policy_for(CHAT, cache_control=header) == CachePolicy(
        key=None, read=False, write=False, max_age=None
    )


# -- stored answers ---------------------------------------------------------------


def test_cached_answer_round_trips() -> None:
    answer = CachedAnswer(stored_at=12.5, body=[{"a": 1}, {"b": [1, 2]}], stream=True)
    assert CachedAnswer.from_bytes(answer.to_bytes()) == answer


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"v": 2, "stored_at": 1, "stream": false, "body": {}}',
        b'{"v": 1, "stream": false, "body": {}}',
        b'{"v": 1, "stored_at": "1", "stream": false, "body": {}}',
        b'{"v": 1, "stored_at": 1, "stream": 0, "body": {}}',
        b'{"v": 1, "stored_at": 1, "stream": true, "body": {}}',
    ],
)
def test_unreadable_entries_are_rejected(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"JSON|cached"):
        CachedAnswer.from_bytes(data)


# -- the memory store ---------------------------------------------------------------


def test_memory_store_expires_entries() -> None:
    clock = task.Clock()
    store = MemoryStore(clock, 1000)
    now(store.set("k", b"value", 10))
    clock.advance(9.9)
    assert now(store.get("k")) == b"value"
    clock.advance(0.1)
    assert now(store.get("k")) is None
    assert store.size == 0 and len(store) == 0


def test_memory_store_evicts_least_recently_used_by_bytes() -> None:
    clock = task.Clock()
    store = MemoryStore(clock, 30)  # each entry: 1 byte of key + 9 of value
    for name in "abc":
        now(store.set(name, b"x" * 9, 60))
    assert store.size == 30
    assert now(store.get("a")) == b"x" * 9  # a is now the most recent
    now(store.set("d", b"y" * 9, 60))
    assert now(store.get("b")) is None
    assert [now(store.get(n)) is not None for n in "acd"] == [True, True, True]
    assert store.size == 30
    # One big entry pushes out as many as it needs, oldest first.
    now(store.set("e", b"z" * 19, 60))
    assert store.size == 30
    assert [now(store.get(n)) is not None for n in "acde"] == [False, False, True, True]


def test_memory_store_replaces_a_key_without_counting_it_twice() -> None:
    store = MemoryStore(task.Clock(), 100)
    now(store.set("k", b"x" * 50, 60))
    now(store.set("k", b"y" * 20, 60))
    assert store.size == 21
    assert now(store.get("k")) == b"y" * 20


def test_memory_store_refuses_an_entry_larger_than_the_budget() -> None:
    store = MemoryStore(task.Clock(), 100)
    now(store.set("small", b"x" * 10, 60))
    now(store.set("big", b"x" * 98, 60))  # 3 + 98 > 100
    assert now(store.get("big")) is None
    assert now(store.get("small")) == b"x" * 10
    # A key that was stored and then overwritten with an oversized value is gone,
    # not left holding the old answer.
    now(store.set("small", b"x" * 200, 60))
    assert now(store.get("small")) is None
    assert store.size == 0


def test_memory_store_exactly_at_budget_is_kept() -> None:
    store = MemoryStore(task.Clock(), 10)
    now(store.set("k", b"x" * 9, 60))
    assert now(store.get("k")) == b"x" * 9


# -- the cache over a store ------------------------------------------------------------


def make_cache(max_bytes: int = 1 << 20) -> tuple[ResponseCache, task.Clock]:
    clock = task.Clock()
    clock.advance(1_000_000)
    return ResponseCache(MemoryStore(clock, max_bytes), clock), clock


ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}


def test_miss_then_hit_with_age() -> None:
    cache, clock = make_cache()
    policy = policy_for(CHAT)
    assert now(cache.lookup(policy)) is None
    assert cache.headers(policy, None) == {b"X-Cache": MISS}
    now(cache.store(policy, ANSWER, stream=False))
    clock.advance(42.7)
    answer = now(cache.lookup(policy))
    assert answer is not None and answer.body == ANSWER and not answer.stream
    assert cache.age(answer) == 42
    assert cache.headers(policy, answer) == {b"X-Cache": HIT, b"Age": b"42"}


def test_bypass_neither_reads_nor_writes() -> None:
    cache, _ = make_cache()
    normal = policy_for(CHAT)
    now(cache.store(normal, ANSWER, stream=False))
    bypass = policy_for(CHAT, cache_control=b"no-store")
    assert now(cache.lookup(bypass)) is None
    assert cache.headers(bypass, None) == {b"X-Cache": BYPASS}
    now(cache.store(bypass, {"other": 1}, stream=False))
    answer = now(cache.lookup(normal))
    assert answer is not None and answer.body == ANSWER


def test_no_cache_refreshes_the_entry() -> None:
    cache, clock = make_cache()
    normal = policy_for(CHAT)
    now(cache.store(normal, {"old": True}, stream=False))
    clock.advance(100)
    refresh = policy_for(CHAT, cache_control=b"no-cache")
    assert refresh.key == normal.key
    assert now(cache.lookup(refresh)) is None
    assert cache.headers(refresh, None) == {b"X-Cache": MISS}
    now(cache.store(refresh, {"new": True}, stream=False))
    answer = now(cache.lookup(normal))
    assert answer is not None and answer.body == {"new": True} and cache.age(answer) == 0


def test_max_age_only_serves_younger_entries() -> None:
    cache, clock = make_cache()
    now(cache.store(policy_for(CHAT), ANSWER, stream=False))
    clock.advance(30)
    assert now(cache.lookup(policy_for(CHAT, cache_control=b"max-age=31"))) is not None
    assert now(cache.lookup(policy_for(CHAT, cache_control=b"max-age=30"))) is None
    assert now(cache.lookup(policy_for(CHAT, cache_control=b"max-age=0"))) is None
    assert now(cache.lookup(policy_for(CHAT))) is not None


def test_entries_expire_after_the_ttl() -> None:
    cache, clock = make_cache()
    config = CacheConfig(ttl=60)
    now(cache.store(policy_for(CHAT, config=config), ANSWER, stream=False))
    clock.advance(59)
    assert now(cache.lookup(policy_for(CHAT, config=config))) is not None
    clock.advance(1)
    assert now(cache.lookup(policy_for(CHAT, config=config))) is None


def test_a_shorter_ttl_after_a_reload_applies_to_old_entries() -> None:
    cache, clock = make_cache()
    now(cache.store(policy_for(CHAT, config=CacheConfig(ttl=3600)), ANSWER, stream=False))
    clock.advance(120)
    assert now(cache.lookup(policy_for(CHAT, config=CacheConfig(ttl=60)))) is None
    assert now(cache.lookup(policy_for(CHAT, config=CacheConfig(ttl=3600)))) is not None


def test_another_caller_does_not_see_the_entry() -> None:
    cache, _ = make_cache()
    now(cache.store(policy_for(CHAT, key_name="alice"), ANSWER, stream=False))
    assert now(cache.lookup(policy_for(CHAT, key_name="bob"))) is None
    assert now(cache.lookup(policy_for(CHAT, key_name=None))) is None


def test_a_store_from_another_host_with_a_fast_clock_has_age_zero() -> None:
    cache, clock = make_cache()
    answer = CachedAnswer(stored_at=clock.seconds() + 5, body={}, stream=False)
    assert cache.age(answer) == 0


class BrokenStore:
    def __init__(self) -> None:
        self.calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        raise ConnectionError("store is down")

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.calls += 1
        raise ConnectionError("store is down")


def test_a_failing_store_is_a_logged_miss(logged: list[LogEvent]) -> None:
    store = BrokenStore()
    cache = ResponseCache(store, task.Clock())
    policy = policy_for(CHAT)
    assert now(cache.lookup(policy)) is None
    now(cache.store(policy, ANSWER, stream=False))
    assert store.calls == 2
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == 2
    assert all(e["log_failure"].check(ConnectionError) for e in failures)


def test_an_unreadable_entry_is_a_logged_miss(logged: list[LogEvent]) -> None:
    clock = task.Clock()
    store = MemoryStore(clock, 1000)
    cache = ResponseCache(store, clock)
    policy = policy_for(CHAT)
    assert policy.key is not None
    now(store.set(policy.key, b"garbage", 60))
    assert now(cache.lookup(policy)) is None
    assert any("unreadable" in e.get("log_format", "") for e in logged)


def test_an_unserialisable_answer_is_not_stored() -> None:
    cache, _ = make_cache()
    policy = policy_for(CHAT)
    now(cache.store(policy, {"n": 2**70}, stream=False))
    assert now(cache.lookup(policy)) is None


# -- streams ---------------------------------------------------------------------


async def chunks_of(items: list[Any], fail_after: int | None = None) -> AsyncGenerator[Any, None]:
    for index, item in enumerate(items):
        if fail_after is not None and index == fail_after:
            raise RuntimeError("upstream broke")
        yield item


async def drain(chunks: AsyncGenerator[Any, None]) -> list[Any]:
    return [chunk async for chunk in chunks]


STREAM = {**CHAT, "stream": True}
CHUNKS = [{"choices": [{"delta": {"content": "Hel"}}]}, {"choices": [{"delta": {"content": "lo"}}]}]


def test_a_completed_stream_is_stored_and_replayed() -> None:
    cache, _ = make_cache()
    policy = policy_for(STREAM)
    assert now(drain(cache.recording(policy, chunks_of(CHUNKS)))) == CHUNKS
    answer = now(cache.lookup(policy))
    assert answer is not None and answer.stream and answer.body == CHUNKS
    assert now(drain(replay(answer))) == CHUNKS
    # The streaming request and the plain one never share an entry.
    assert now(cache.lookup(policy_for(CHAT))) is None


def test_a_failed_stream_is_not_stored() -> None:
    cache, _ = make_cache()
    policy = policy_for(STREAM)
    with pytest.raises(RuntimeError):
        now(drain(cache.recording(policy, chunks_of(CHUNKS, fail_after=1))))
    assert now(cache.lookup(policy)) is None


def test_an_abandoned_stream_is_not_stored() -> None:
    cache, _ = make_cache()
    policy = policy_for(STREAM)
    recording = cache.recording(policy, chunks_of(CHUNKS))
    assert now(anext(recording)) == CHUNKS[0]
    now(recording.aclose())
    assert now(cache.lookup(policy)) is None


def test_an_empty_stream_is_not_stored() -> None:
    cache, _ = make_cache()
    policy = policy_for(STREAM)
    assert now(drain(cache.recording(policy, chunks_of([])))) == []
    assert now(cache.lookup(policy)) is None


def test_recording_with_a_bypass_policy_passes_chunks_through() -> None:
    cache, _ = make_cache()
    policy = policy_for({**STREAM, "temperature": 1})
    assert policy.key is None
    assert now(drain(cache.recording(policy, chunks_of(CHUNKS)))) == CHUNKS


class HeldStore(MemoryStore):
    """A store whose writes finish when the test says so, as Redis's do later."""

    def __init__(self, clock: task.Clock) -> None:
        super().__init__(clock, 1 << 20)
        self.writing: defer.Deferred[None] = defer.Deferred()
        self.closed = False

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.writing
        assert not self.closed, "written after the store was closed"
        await super().set(key, value, ttl)

    async def close(self) -> None:
        self.closed = True
        await super().close()


def test_closing_waits_for_the_streams_being_stored() -> None:
    clock = task.Clock()
    store = HeldStore(clock)
    cache = ResponseCache(store, clock)
    assert now(drain(cache.recording(policy_for(STREAM), chunks_of(CHUNKS)))) == CHUNKS
    closing = defer.Deferred.fromCoroutine(cache.close())
    assert not closing.called and not store.closed
    store.writing.callback(None)
    assert closing.called and store.closed
    assert len(store) == 0


def test_replay_of_a_plain_answer_is_one_chunk() -> None:
    answer = CachedAnswer(stored_at=0, body={"a": 1}, stream=False)
    assert now(drain(replay(answer))) == [{"a": 1}]


def test_build_cache() -> None:
    clock = task.Clock()
    cache, client = build_cache(CacheConfig(max_bytes=1234), clock)
    assert client is None
    assert isinstance(cache.store_backend, MemoryStore)
    assert cache.store_backend.max_bytes == 1234
    config = CacheConfig(backend="redis", redis_url="redis://:pw@127.0.0.1:1/3")
    cache, client = build_cache(config, clock)
    assert isinstance(cache.store_backend, RedisStore)
    assert client is not None and str(client.address) == "127.0.0.1:1 db 3"
    assert clock.getDelayedCalls() == []  # nothing connects until it is used
