"""
The response cache: exact-match replay of answers that are deterministic by nature.

Only requests whose answer does not depend on chance are cached: embeddings
always; chat and text completions with ``temperature: 0`` or a ``seed``, and
one choice.  The key is the SHA-256 of a canonical JSON document holding the
normalised body, the route, the resolved model and backend, and the caller's
key name (tenants never see each other's replays unless
``share_across_keys``).  A streamed answer is stored as its list of chunk
objects and replayed as a stream.

The request's ``Cache-Control`` is honoured as HTTP says: ``no-store``
bypasses the cache, ``no-cache`` refreshes it, ``max-age=N`` bounds the age
of what may be served.  The cache is an optimisation and never a reason for
a request to fail: a store that errs is logged and treated as a miss.

The pure part (:func:`cache_policy`, :func:`cache_key`,
:func:`parse_cache_control`) decides; :class:`ResponseCache` acts on a
:class:`CachePolicy` over an :class:`ICacheStore`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from oproxy.config import CacheConfig
from oproxy.resp import RedisClient

log = Logger()

KEY_VERSION = "v1"
REDIS_PREFIX = b"oproxy:cache:"

#: Body fields that say who asked or how to bill, not what to answer.
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
)

#: ``max-age`` values beyond this are clamped, as RFC 9111 §1.2.2 says.
MAX_DELTA_SECONDS = 2**31

HIT = b"HIT"
MISS = b"MISS"
BYPASS = b"BYPASS"


# -- policy (pure) -----------------------------------------------------------


@dataclass(frozen=True)
class CachePolicy:
    """
    What the cache may do for one request.

    :ivar key: the cache key, or ``None`` when the cache is bypassed
        (``X-Cache: BYPASS``).
    :ivar read: whether a stored answer may be served.
    :ivar write: whether the fresh answer is to be stored.
    :ivar max_age: the oldest answer (seconds) the client accepts, if it said.
    :ivar ttl: how long a stored answer stays fresh, from the request's
        config snapshot; answers older than this are never served, even if
        the store still holds them from before a reload.
    """

    key: str | None
    read: bool
    write: bool
    max_age: float | None
    ttl: float = CacheConfig().ttl


NO_CACHE_POLICY = CachePolicy(key=None, read=False, write=False, max_age=None)


@dataclass(frozen=True)
class CacheControl:
    """The request directives of a ``Cache-Control`` header that the cache obeys."""

    no_store: bool = False
    no_cache: bool = False
    max_age: int | None = None


def is_deterministic(route: str, body: Mapping[str, Any]) -> bool:
    """
    Whether the answer to ``body`` on ``route`` is fixed by the body alone.

    Embeddings always are.  A completion is when sampling is greedy
    (``temperature`` 0) or seeded, and only one choice is asked for: the
    choices of ``n > 1`` differ from each other by design.
    """
    if route == "embeddings":
        return True
    if route not in ("chat", "completions"):
        return False
    n = body.get("n")
    if n is not None and (not _is_number(n) or n != 1):
        return False
    temperature = body.get("temperature")
    greedy = _is_number(temperature) and temperature == 0
    seed = body.get("seed")
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    return greedy or seeded


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def normalise_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """
    The body without what does not change the answer.

    Drops the caller's bookkeeping fields and spells defaults one way
    (``stream: false`` and ``n: 1`` are the same request as leaving them out).
    ``stream`` and ``stream_options`` stay: they change the answer's shape.
    """
    normal = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    if normal.get("stream") in (False, None):
        normal.pop("stream", None)
    if normal.get("n", 0) == 1 and _is_number(normal["n"]):
        del normal["n"]
    return normal


def cache_key(
    route: str,
    body: Mapping[str, Any],
    *,
    model: str,
    backend: str,
    key_name: str | None,
    shared: bool = False,
) -> str:
    """
    The key an answer is stored under: ``v1:`` and a SHA-256 in hex.

    :param model: the resolved (upstream) model name; the client's name is
        in the body, and both matter (the answer echoes the client's).
    :param key_name: the caller's API key name, ``None`` for anonymous.
    :param shared: one key for every caller (``share_across_keys``); the
        three kinds of caller never share a key with each other, so changing
        the setting cannot leak answers across tenants.
    :raises TypeError: the body holds something JSON cannot say.
    """
    if shared:
        caller: list[str] = ["shared"]
    elif key_name is None:
        caller = ["anonymous"]
    else:
        caller = ["key", key_name]
    document = {
        "route": route,
        "model": model,
        "backend": backend,
        "caller": caller,
        "body": normalise_body(body),
    }
    try:
        canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as e:
        raise TypeError(f"the request cannot be a cache key: {e}") from None
    return f"{KEY_VERSION}:{hashlib.sha256(canonical).hexdigest()}"


def parse_cache_control(header: bytes | None) -> CacheControl:
    """
    The directives of a request's ``Cache-Control`` header (RFC 9111 §5.2.1).

    Names are case-insensitive, values may be quoted, unknown directives
    and junk are ignored.  A ``max-age`` that is not a non-negative integer
    counts as ``0`` (serve nothing stored): when a client's limit cannot be
    read, the fresh answer is the safe one.  Repeated ``max-age`` takes the
    strictest.  Pass every ``Cache-Control`` line joined with ``b", "``.
    """
    if not header:
        return CacheControl()
    no_store = no_cache = False
    max_age: int | None = None
    for directive in _split_directives(header.decode("latin-1")):
        name, equals, value = directive.partition("=")
        name = name.strip().lower()
        if name == "no-store":
            no_store = True
        elif name == "no-cache":
            no_cache = True
        elif name == "max-age":
            seconds = _delta_seconds(value.strip()) if equals else 0
            max_age = seconds if max_age is None else min(max_age, seconds)
    return CacheControl(no_store=no_store, no_cache=no_cache, max_age=max_age)


def _split_directives(text: str) -> list[str]:
    """Split on commas that are not inside a quoted string."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted:
            if char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ",":
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _delta_seconds(value: str) -> int:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value.isascii() or not value.isdigit():
        return 0
    if len(value) > 10:
        return MAX_DELTA_SECONDS
    return min(int(value), MAX_DELTA_SECONDS)


def cache_policy(
    route: str,
    body: Mapping[str, Any],
    *,
    model: str,
    backend: str,
    key_name: str | None,
    cache_control: bytes | None,
    config: CacheConfig,
) -> CachePolicy:
    """
    Decide what the cache may do for one request.

    :param route: ``chat``, ``completions`` or ``embeddings``.
    :param model: the resolved (upstream) model name.
    :param backend: the name of the backend the request is routed to.
    :param key_name: the caller's API key name (``None``: anonymous).
    :param cache_control: the request's ``Cache-Control`` header(s), joined.
    """
    if not config.enabled or not is_deterministic(route, body):
        return NO_CACHE_POLICY
    directives = parse_cache_control(cache_control)
    if directives.no_store:
        return NO_CACHE_POLICY
    try:
        key = cache_key(
            route,
            body,
            model=model,
            backend=backend,
            key_name=key_name,
            shared=config.share_across_keys,
        )
    except TypeError:
        return NO_CACHE_POLICY
    read = not directives.no_cache and directives.max_age != 0
    max_age = None if directives.max_age is None else float(directives.max_age)
    return CachePolicy(key=key, read=read, write=True, max_age=max_age, ttl=config.ttl)


# -- stored answers ----------------------------------------------------------


@dataclass(frozen=True)
class CachedAnswer:
    """
    One stored answer.

    :ivar stored_at: clock seconds when it was stored (for ``Age``).
    :ivar body: the JSON response object, or for a stream its list of chunks.
    :ivar stream: whether ``body`` is a list of stream chunks.
    """

    stored_at: float
    body: Any
    stream: bool

    def to_bytes(self) -> bytes:
        """
        :raises TypeError: the body holds something JSON cannot say.
        """
        try:
            return orjson.dumps(
                {"v": 1, "stored_at": self.stored_at, "stream": self.stream, "body": self.body}
            )
        except orjson.JSONEncodeError as e:
            raise TypeError(f"the answer cannot be cached: {e}") from None

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedAnswer:
        """
        :raises ValueError: ``data`` is not a stored answer of this version.
        """
        try:
            entry = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(entry, dict) or entry.get("v") != 1:
            raise ValueError("not a cached answer of this version")
        stored_at, stream, body = entry.get("stored_at"), entry.get("stream"), entry.get("body")
        if (
            not isinstance(stored_at, int | float)
            or isinstance(stored_at, bool)
            or not isinstance(stream, bool)
        ):
            raise ValueError("a cached answer needs stored_at and stream")
        if stream and not isinstance(body, list):
            raise ValueError("a cached stream must be a list of chunks")
        return cls(stored_at=float(stored_at), body=body, stream=stream)


# -- stores ------------------------------------------------------------------


class ICacheStore(Interface):
    """
    Bytes under keys, each for a while.

    A store may forget anything at any time; callers treat ``None`` as a miss.
    """

    async def get(key: str) -> bytes | None:
        """The value stored under ``key``, if it is there and has not expired."""

    async def set(key: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds."""

    async def close() -> None:
        """Let go of what the store holds (entries, connections)."""


@implementer(ICacheStore)
class MemoryStore:
    """
    A least-recently-used map in this process, bounded in bytes.

    The size of an entry is its key and value lengths: what the client can
    make us hold.  Expired entries are dropped when they are looked up, and
    otherwise age out of the LRU order like any other.
    """

    def __init__(self, clock: IReactorTime, max_bytes: int) -> None:
        self._clock = clock
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if self._clock.seconds() >= expires:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._remove(key)
        size = _entry_size(key, value)
        if size > self.max_bytes or ttl <= 0:
            return
        self._entries[key] = (value, self._clock.seconds() + ttl)
        self.size += size
        while self.size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)

    async def close(self) -> None:
        self._entries.clear()
        self.size = 0

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= _entry_size(key, entry[0])


def _entry_size(key: str, value: bytes) -> int:
    return len(key) + len(value)


@implementer(ICacheStore)
class RedisStore:
    """
    Entries in Redis, shared by every worker and host, expired by Redis.

    Failures are logged and swallowed: ``get`` answers ``None`` and ``set``
    does nothing.  The first failure is a warning and the recovery a notice;
    the failures in between are debug lines, so an outage does not write one
    warning per request.

    :param max_value_bytes: values larger than this are not stored.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: bytes = REDIS_PREFIX,
        max_value_bytes: int | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._max_value_bytes = max_value_bytes
        self._healthy = True

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self._client.execute(b"GET", self._prefix + key.encode("utf-8"))
        except defer.CancelledError:
            raise
        except Exception as e:
            self._failed("GET", e)
            return None
        self._answered()
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        milliseconds = int(ttl * 1000)
        if milliseconds <= 0:
            return
        if self._max_value_bytes is not None and len(value) > self._max_value_bytes:
            return
        try:
            await self._client.execute(
                b"SET", self._prefix + key.encode("utf-8"), value, b"PX", milliseconds
            )
        except defer.CancelledError:
            raise
        except Exception as e:
            self._failed("SET", e)
            return
        self._answered()

    async def close(self) -> None:
        await self._client.close()

    def _failed(self, command: str, error: Exception) -> None:
        if self._healthy:
            self._healthy = False
            log.warn(
                "Response cache: Redis {command} failed, serving without the cache "
                "until Redis answers again: {error}",
                command=command,
                error=str(error),
                address=str(self._client.address),
            )
        else:
            log.debug(
                "Response cache: Redis {command} failed: {error}",
                command=command,
                error=str(error),
            )

    def _answered(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.info("Response cache: Redis is answering again")


# -- the cache ---------------------------------------------------------------


class ResponseCache:
    """
    Looks answers up and stores them, as a :class:`CachePolicy` allows.

    Nothing here raises for a failing store: the request goes on as a miss.
    """

    def __init__(self, store: ICacheStore, clock: IReactorTime) -> None:
        self.store_backend = store
        self._clock = clock
        #: Streams being stored in the background, which :meth:`close` awaits.
        self._storing: set[defer.Deferred[None]] = set()

    async def close(self) -> None:
        """
        Let go of the store (entries, a Redis connection), once the streams
        being stored in the background are stored: at a stop, and when a
        reload replaces this cache.
        """
        while self._storing:
            await defer.DeferredList(list(self._storing))
        await self.store_backend.close()

    async def lookup(self, policy: CachePolicy) -> CachedAnswer | None:
        """The stored answer the policy lets us serve, if there is one."""
        if policy.key is None or not policy.read:
            return None
        try:
            data = await self.store_backend.get(policy.key)
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("Response cache lookup failed; treating it as a miss")
            return None
        if data is None:
            return None
        try:
            answer = CachedAnswer.from_bytes(data)
        except ValueError as e:
            log.warn("Response cache: ignoring an unreadable entry: {error}", error=str(e))
            return None
        age = self._clock.seconds() - answer.stored_at
        if age >= policy.ttl:
            return None
        if policy.max_age is not None and age >= policy.max_age:
            return None
        return answer

    async def store(self, policy: CachePolicy, answer_body: Any, *, stream: bool) -> None:
        """
        Store a fresh answer, if the policy says so.

        Only store complete, successful answers: a 200 body, or every chunk
        of a stream that ended normally.
        """
        if policy.key is None or not policy.write:
            return
        answer = CachedAnswer(stored_at=self._clock.seconds(), body=answer_body, stream=stream)
        try:
            data = answer.to_bytes()
        except TypeError as e:
            log.warn("Response cache: cannot store an answer: {error}", error=str(e))
            return
        try:
            await self.store_backend.set(policy.key, data, policy.ttl)
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("Response cache store failed; the answer is not cached")

    def age(self, answer: CachedAnswer) -> int:
        """Whole seconds since the answer was stored (the ``Age`` header)."""
        return max(0, int(self._clock.seconds() - answer.stored_at))

    def headers(self, policy: CachePolicy, answer: CachedAnswer | None) -> dict[bytes, bytes]:
        """
        The response headers that tell the client what the cache did.

        ``X-Cache: HIT`` with ``Age`` for an answer served from the cache;
        ``MISS`` when the cache was consulted (or refreshed) and the answer is
        fresh; ``BYPASS`` when the request is not cacheable or said
        ``no-store``.
        """
        if answer is not None:
            return {b"X-Cache": HIT, b"Age": b"%d" % self.age(answer)}
        return {b"X-Cache": BYPASS if policy.key is None else MISS}

    async def recording(
        self, policy: CachePolicy, chunks: AsyncGenerator[Any, None]
    ) -> AsyncGenerator[Any, None]:
        """
        Pass a stream through, and store it once it has ended normally.

        A stream that fails, or that the client abandons, is not stored.
        The store runs in the background: the client's ``[DONE]`` does not
        wait for it.
        """
        if policy.key is None or not policy.write:
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
            return
        seen: list[Any] = []
        async with aclosing(chunks):
            async for chunk in chunks:
                seen.append(chunk)
                yield chunk
        if seen:
            storing = defer.Deferred.fromCoroutine(self.store(policy, seen, stream=True))
            if not storing.called:
                self._storing.add(storing)
                storing.addBoth(self._stored, storing)

    def _stored(self, result: object, storing: defer.Deferred[None]) -> object:
        self._storing.discard(storing)
        return result


def build_cache(config: CacheConfig, reactor: Any) -> tuple[ResponseCache, RedisClient | None]:
    """
    The cache the configuration asks for, and its Redis client if it has one.

    Nothing connects here; a Redis store connects on first use, and
    :meth:`ResponseCache.close` closes its client.
    """
    if config.backend == "redis":
        client = RedisClient(reactor, config.redis_url)
        store: ICacheStore = RedisStore(client, max_value_bytes=config.max_bytes)
        return ResponseCache(store, reactor), client
    return ResponseCache(MemoryStore(reactor, config.max_bytes), reactor), None


async def replay(answer: CachedAnswer) -> AsyncGenerator[Any, None]:
    """The chunks of a cached stream, for :func:`oproxy.streaming.relay_sse`."""
    chunks = answer.body if answer.stream else [answer.body]
    for chunk in chunks:
        yield chunk
