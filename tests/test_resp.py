"""
The RESP client: RESP2 parsing in memory, then everything else against a
real ``redis-server`` started for this module on a free loopback port.

The server comes from :mod:`tests.redisserver` (skipped without
``redis-server``, except under CI).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from oproxy.cache import CachePolicy, RedisStore, ResponseCache
from oproxy.resp import (
    RedisAddress,
    RedisClient,
    RedisConnectionError,
    RedisError,
    RedisProtocol,
    RedisReplyError,
    encode_command,
    parse_reply,
    redact,
)
from tests import redisserver
from tests.redisserver import RedisServer, free_port

#: The module's server; a plain name, so test parameters may take it.
redis_server = redisserver.redis_server

# -- RESP2 in memory ------------------------------------------------------------


def test_encode_command() -> None:
    assert encode_command((b"SET", "ключ", 42)) == (
        b"*3\r\n$3\r\nSET\r\n$8\r\n" + "ключ".encode() + b"\r\n$2\r\n42\r\n"
    )
    assert encode_command(("GET", b"")) == b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n"
    with pytest.raises(TypeError, match="bool"):
        encode_command(("SET", "k", True))
    with pytest.raises(TypeError, match="float"):
        encode_command(("SET", "k", 1.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        encode_command(())


WIRE = (
    b"+OK\r\n"
    b"$7\r\nhe\r\nl\x00o\r\n"
    b":-42\r\n"
    b"*3\r\n$1\r\na\r\n$-1\r\n*2\r\n:1\r\n-ERR inner\r\n"
    b"$0\r\n\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
)
REPLIES = 8


def connected(timeout: float | None = 5.0) -> tuple[RedisProtocol, StringTransport, task.Clock]:
    clock = task.Clock()
    protocol = RedisProtocol(clock, timeout)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def outcomes(deferreds: list[defer.Deferred[Any]]) -> list[Any]:
    results: list[Any] = []
    for d in deferreds:
        d.addBoth(results.append)
    return results


def check_replies(results: list[Any]) -> None:
    assert results[:3] == ["OK", b"he\r\nl\x00o", -42]
    first, second, inner = results[3]
    assert (first, second, inner[0]) == (b"a", None, 1)
    assert isinstance(inner[1], RedisReplyError) and inner[1].code == "ERR"
    assert results[4:7] == [b"", None, []]
    assert isinstance(results[7], Failure)
    assert results[7].check(RedisReplyError) and results[7].value.code == "WRONGTYPE"


def test_replies_split_byte_by_byte() -> None:
    protocol, transport, _ = connected()
    results = outcomes([protocol.send((b"X",)) for _ in range(REPLIES)])
    assert transport.value() == encode_command((b"X",)) * REPLIES
    for index in range(len(WIRE)):
        protocol.dataReceived(WIRE[index : index + 1])
    assert len(results) == REPLIES
    check_replies(results)


def test_many_replies_in_one_read() -> None:
    protocol, _, _ = connected()
    results = outcomes([protocol.send((b"X",)) for _ in range(REPLIES)])
    protocol.dataReceived(WIRE)
    check_replies(results)


@given(st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=12))
def test_replies_split_anywhere(cuts: list[int]) -> None:
    protocol, _, _ = connected()
    results = outcomes([protocol.send((b"X",)) for _ in range(REPLIES)])
    edges = [0, *sorted(cuts), len(WIRE)]
    for start, end in itertools.pairwise(edges):
        protocol.dataReceived(WIRE[start:end])
    check_replies(results)


def test_a_large_bulk_reply_in_pieces() -> None:
    protocol, _, _ = connected()
    results = outcomes([protocol.send((b"GET", b"k"))])
    value = os.urandom(300_000)
    wire = b"$%d\r\n" % len(value) + value + b"\r\n"
    for start in range(0, len(wire), 65536):
        assert not results
        protocol.dataReceived(wire[start : start + 65536])
    assert results == [value]


@pytest.mark.parametrize(
    "wire",
    [b"?what\r\n", b":12x\r\n", b"$3\r\nabcd\r\n", b"$-2\r\n", b"*-3\r\n"],
)
def test_garbage_drops_the_connection(wire: bytes) -> None:
    protocol, transport, _ = connected()
    results = outcomes([protocol.send((b"PING",))])
    protocol.dataReceived(wire)
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionError("aborted")))
    failure = results[-1]
    assert isinstance(failure, Failure) and failure.check(RedisConnectionError)
    assert not protocol.usable


def test_an_unasked_for_reply_drops_the_connection() -> None:
    protocol, transport, _ = connected()
    results = outcomes([protocol.send((b"PING",))])
    protocol.dataReceived(b"+PONG\r\n+PONG\r\n")
    assert results == ["PONG"]
    assert transport.disconnecting and not protocol.usable
    protocol.dataReceived(b"+PONG\r\n")  # nothing more is read from a broken stream
    assert results == ["PONG"]


def test_parse_reply_needs_more() -> None:
    assert parse_reply(b"$5\r\nabc", 0) is None
    assert parse_reply(b"*2\r\n:1\r\n", 0) is None
    assert parse_reply(b"+OK", 0) is None
    assert parse_reply(b"xx:7\r\n", 2) == (7, 6)


def test_a_silent_server_times_out_and_fails_every_pending_command() -> None:
    protocol, transport, clock = connected(timeout=2.0)
    results = outcomes([protocol.send((b"GET", b"a")), protocol.send((b"GET", b"b"))])
    clock.advance(1.5)
    protocol.dataReceived(b"$1\r\nA\r\n")
    assert results == [b"A"]
    clock.advance(1.9)  # the timeout restarts with each reply
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    assert not protocol.usable
    late = outcomes([protocol.send((b"PING",))])
    assert isinstance(late[0], Failure) and late[0].check(RedisConnectionError)
    protocol.connectionLost(Failure(ConnectionError("aborted")))
    assert isinstance(results[1], Failure)
    assert "did not answer within 2.0 seconds" in str(results[1].value)


def test_no_timer_when_nothing_is_pending() -> None:
    protocol, transport, clock = connected(timeout=1.0)
    outcomes([protocol.send((b"PING",))])
    protocol.dataReceived(b"+PONG\r\n")
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert not transport.disconnecting


def test_a_cancelled_command_keeps_the_replies_in_step() -> None:
    protocol, _, _ = connected()
    first = protocol.send((b"GET", b"a"))
    results = outcomes([protocol.send((b"GET", b"b"))])
    first.cancel()
    first.addErrback(lambda f: f.trap(defer.CancelledError))
    protocol.dataReceived(b"$1\r\nA\r\n$1\r\nB\r\n")
    assert results == [b"B"]


@pytest.mark.parametrize(
    ("url", "expected", "handshake"),
    [
        (
            "redis://127.0.0.1:6380/2",
            RedisAddress("127.0.0.1", 6380, None, 2, None, None),
            [(b"SELECT", 2)],
        ),
        ("redis://cache", RedisAddress("cache", 6379, None, 0, None, None), []),
        ("redis://[::1]:7000/", RedisAddress("::1", 7000, None, 0, None, None), []),
        (
            "redis://:s%40cret@h/1",
            RedisAddress("h", 6379, None, 1, None, "s@cret"),
            [(b"AUTH", "s@cret"), (b"SELECT", 1)],
        ),
        (
            "redis://app:pw@h:1/0",
            RedisAddress("h", 1, None, 0, "app", "pw"),
            [(b"AUTH", "app", "pw")],
        ),
        (
            "unix:///run/redis.sock?db=3&password=pw",
            RedisAddress(None, 6379, "/run/redis.sock", 3, None, "pw"),
            [(b"AUTH", "pw"), (b"SELECT", 3)],
        ),
    ],
)
def test_urls(url: str, expected: RedisAddress, handshake: list[tuple[Any, ...]]) -> None:
    address = RedisAddress.from_url(url)
    assert address == expected
    assert address.handshake() == handshake
    assert "pw" not in str(address) and "cret" not in str(address)


@pytest.mark.parametrize(
    "url", ["http://h", "redis://h/x", "redis://h/-1", "redis://h:port", "unix://", "h:6379"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        RedisAddress.from_url(url)


def test_redact() -> None:
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert redact("unix:///s?db=1&password=pw") == "unix://:***@/s?db=1&password=***"


# -- a real server ------------------------------------------------------------------


@pytest.fixture
def clients(redis_server: RedisServer) -> Iterator[list[RedisClient]]:
    """Clients made by a test, all closed after it."""
    made: list[RedisClient] = []
    yield made
    for client in made:
        pytest_twisted.blockon(client.close())


@pytest.fixture
def connect(redis_server: RedisServer, clients: list[RedisClient]) -> Any:
    def make(url: str | None = None, **options: Any) -> RedisClient:
        client = RedisClient(reactor, url or redis_server.url, **options)
        clients.append(client)
        return client

    return make


def unique() -> str:
    return "test:" + uuid.uuid4().hex


@pytest_twisted.ensureDeferred
async def test_set_get_incr(connect: Any) -> None:
    client = connect()
    key, counter = unique(), unique()
    assert await client.execute("PING") == "PONG"
    assert await client.execute("SET", key, "välue") == "OK"
    assert await client.execute("GET", key) == "välue".encode()
    assert await client.execute("GET", unique()) is None
    assert await client.execute("INCR", counter) == 1
    assert await client.execute("INCRBY", counter, 41) == 42
    assert await client.execute("MGET", key, unique(), counter) == [
        "välue".encode(),
        None,
        b"42",
    ]
    assert await client.execute("DEL", key, counter) == 2


@pytest_twisted.ensureDeferred
async def test_binary_and_large_values(connect: Any) -> None:
    client = connect()
    key = unique()
    value = os.urandom(2_000_000) + b"\r\n$-1\r\n"
    assert await client.execute(b"SET", key, value) == "OK"
    assert await client.execute(b"GET", key) == value


@pytest_twisted.ensureDeferred
async def test_error_replies_raise_and_the_connection_lives_on(connect: Any) -> None:
    client = connect()
    key = unique()
    await client.execute("SET", key, "text")
    with pytest.raises(RedisReplyError, match="not an integer") as caught:
        await client.execute("INCR", key)
    assert caught.value.code == "ERR"
    with pytest.raises(RedisReplyError) as caught:
        await client.execute("LPUSH", key, "x")
    assert caught.value.code == "WRONGTYPE"
    with pytest.raises(RedisError, match="unknown command"):
        await client.execute("NO-SUCH-COMMAND")
    assert await client.execute("GET", key) == b"text"


@pytest_twisted.ensureDeferred
async def test_lua_scripts(connect: Any) -> None:
    client = connect()
    script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    sha = await client.execute("SCRIPT", "LOAD", script)
    key = unique()
    assert await client.execute("EVALSHA", sha, 1, key, 5) == 5
    with pytest.raises(RedisReplyError) as caught:
        await client.execute("EVALSHA", "0" * 40, 0)
    assert caught.value.code == "NOSCRIPT"


@pytest_twisted.ensureDeferred
async def test_a_thousand_concurrent_commands_share_one_connection(connect: Any) -> None:
    client = connect()
    key = unique()
    before = await client.execute("CLIENT", "ID")
    replies = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(client.execute("INCR", key)) for _ in range(1000)]
    )
    assert replies == list(range(1, 1001))
    assert await client.execute("CLIENT", "ID") == before


@pytest_twisted.ensureDeferred
async def test_concurrent_first_commands_share_one_connection(connect: Any) -> None:
    client = connect()
    ids = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(client.execute("CLIENT", "ID")) for _ in range(20)]
    )
    assert len(set(ids)) == 1


@pytest_twisted.ensureDeferred
async def test_select_database_from_the_url(connect: Any, redis_server: RedisServer) -> None:
    zero, five = connect(), connect(redis_server.url + "/5")
    key = unique()
    await zero.execute("SET", key, "zero")
    assert await five.execute("GET", key) is None
    await five.execute("SET", key, "five")
    assert await zero.execute("GET", key) == b"zero"
    assert await five.execute("GET", key) == b"five"


@pytest_twisted.ensureDeferred
async def test_unix_socket_url(connect: Any, redis_server: RedisServer) -> None:
    key = unique()
    await connect(redis_server.url + "/4").execute("SET", key, "four")
    client = connect(f"unix://{redis_server.socket}?db=4")
    assert await client.execute("GET", key) == b"four"


@pytest_twisted.ensureDeferred
async def test_auth_from_the_url(connect: Any, redis_server: RedisServer) -> None:
    admin = connect()
    user = "u" + uuid.uuid4().hex[:8]
    await admin.execute("ACL", "SETUSER", user, "on", ">p@ss word", "~*", "+@all")
    try:
        client = connect(f"redis://{user}:p%40ss%20word@127.0.0.1:{redis_server.port}/0")
        assert await client.execute("ACL", "WHOAMI") == user.encode()
        wrong = connect(f"redis://{user}:nope@127.0.0.1:{redis_server.port}/0")
        with pytest.raises(RedisReplyError) as caught:
            await wrong.execute("PING")
        assert caught.value.code == "WRONGPASS"
    finally:
        await admin.execute("ACL", "DELUSER", user)


@pytest_twisted.ensureDeferred
async def test_nothing_listening_fails_fast(connect: Any) -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}", retry_delay=60)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await client.execute("PING")
    # Within retry_delay, no new attempt: the last error, at once.
    with pytest.raises(RedisConnectionError, match=r"not connected to Redis at 127\.0\.0\.1"):
        await client.execute("PING")
    assert time.monotonic() - started < 1


@pytest_twisted.ensureDeferred
async def test_reconnects_after_the_server_restarts(
    connect: Any, redis_server: RedisServer
) -> None:
    client = connect(retry_delay=0)
    key = unique()
    await client.execute("SET", key, "before")
    first = await client.execute("CLIENT", "ID")
    redis_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await client.execute("GET", key)
        assert time.monotonic() - started < 1
    finally:
        redis_server.start()
    assert await client.execute("PING") == "PONG"
    assert await client.execute("GET", key) is None  # a fresh server, with --save ''
    assert await client.execute("CLIENT", "ID") != first


@pytest_twisted.ensureDeferred
async def test_a_command_on_a_dropped_connection_fails_then_the_next_reconnects(
    connect: Any,
) -> None:
    client = connect()
    admin = connect()
    mine = await client.execute("CLIENT", "ID")
    assert await admin.execute("CLIENT", "KILL", "ID", mine) == 1
    # The kill may or may not have been noticed yet: either way, at most one
    # command fails, fast, and the one after it reconnects.
    with contextlib.suppress(RedisConnectionError):
        await client.execute("PING")
    assert await client.execute("PING") == "PONG"
    assert await client.execute("CLIENT", "ID") != mine


class Silent(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_times_out(connect: Any) -> None:
    connections: list[Protocol] = []

    class Counting(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:
            protocol = Silent()
            connections.append(protocol)
            return protocol

    port = reactor.listenTCP(0, Counting(), interface="127.0.0.1")
    try:
        client = connect(f"redis://127.0.0.1:{port.getHost().port}", command_timeout=0.1)
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match="did not answer"):
            await client.execute("PING")
        assert time.monotonic() - started < 1
        with pytest.raises(RedisConnectionError, match="did not answer"):
            await client.execute("PING")
        assert len(connections) == 2
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_cancelled_command_does_not_disturb_the_next(connect: Any) -> None:
    client = connect()
    key = unique()
    waiting = defer.Deferred.fromCoroutine(client.execute("BLPOP", unique(), "0.2"))
    after = defer.Deferred.fromCoroutine(client.execute("SET", key, "v"))
    waiting.cancel()
    with pytest.raises(defer.CancelledError):
        await waiting
    assert await after == "OK"
    assert await client.execute("GET", key) == b"v"


@pytest_twisted.ensureDeferred
async def test_close(connect: Any) -> None:
    client = connect()
    await client.execute("PING")
    await client.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.execute("PING")
    await client.close()
    await connect().close()  # never connected


@pytest_twisted.ensureDeferred
async def test_close_while_connecting(connect: Any) -> None:
    client = connect()
    pending = defer.Deferred.fromCoroutine(client.execute("PING"))
    await client.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await pending


# -- the cache over Redis --------------------------------------------------------------


def policy(ttl: float = 60, **changes: Any) -> CachePolicy:
    fields: dict[str, Any] = {"key": "v1:" + uuid.uuid4().hex, "read": True, "write": True}
    fields.update(max_age=None, ttl=ttl)
    fields.update(changes)
    return CachePolicy(**fields)


@pytest_twisted.ensureDeferred
async def test_response_cache_over_redis(connect: Any) -> None:
    client = connect()
    cache = ResponseCache(RedisStore(client), reactor)
    wanted = policy(ttl=30)
    assert await cache.lookup(wanted) is None
    await cache.store(wanted, {"object": "embedding", "data": [1.5]}, stream=False)
    answer = await cache.lookup(wanted)
    assert answer is not None and answer.body == {"object": "embedding", "data": [1.5]}
    assert cache.age(answer) == 0
    assert wanted.key is not None
    stored = "oproxy:cache:" + wanted.key
    assert await client.execute("EXISTS", stored) == 1
    assert 29_000 < await client.execute("PTTL", stored) <= 30_000


@pytest_twisted.ensureDeferred
async def test_redis_expires_entries(connect: Any) -> None:
    client = connect()
    cache = ResponseCache(RedisStore(client), reactor)
    short = policy(ttl=0.05)
    await cache.store(short, [{"chunk": 1}], stream=True)
    answer = await cache.lookup(short)
    assert answer is not None and answer.stream and answer.body == [{"chunk": 1}]
    await task.deferLater(reactor, 0.1)
    assert await cache.lookup(short) is None


@pytest_twisted.ensureDeferred
async def test_redis_store_skips_oversized_values(connect: Any) -> None:
    cache = ResponseCache(RedisStore(connect(), max_value_bytes=100), reactor)
    wanted = policy()
    await cache.store(wanted, {"data": "x" * 200}, stream=False)
    assert await cache.lookup(wanted) is None
    await cache.store(wanted, {"data": "x"}, stream=False)
    assert await cache.lookup(wanted) is not None


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.ensureDeferred
async def test_redis_down_is_a_logged_miss_and_recovery_is_noticed(
    connect: Any, redis_server: RedisServer, logged: list[LogEvent]
) -> None:
    client = connect(retry_delay=0, command_timeout=1)
    cache = ResponseCache(RedisStore(client), reactor)
    wanted = policy()
    await cache.store(wanted, {"a": 1}, stream=False)
    redis_server.stop()
    try:
        for _ in range(3):
            assert await cache.lookup(wanted) is None
            await cache.store(wanted, {"a": 2}, stream=False)
    finally:
        redis_server.start()
    mine = [e for e in logged if "Response cache" in e.get("log_format", "")]
    warnings = [e for e in mine if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert "password" not in warnings[0]["address"]
    assert len([e for e in mine if e["log_level"] == LogLevel.debug]) == 5
    assert not any("log_failure" in e for e in logged)
    await cache.store(wanted, {"a": 3}, stream=False)
    answer = await cache.lookup(wanted)
    assert answer is not None and answer.body == {"a": 3}
    assert [e["log_level"] for e in logged if "answering again" in e["log_format"]] == [
        LogLevel.info
    ]
