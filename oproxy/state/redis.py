"""
The shared state store for several hosts: Redis, one Lua script per atomic step.

Why scripts: an admission reads every bucket, decides, then writes all of
them; Redis runs a script with nothing in between, so that is atomic however
many processes and hosts share the limits, with one round trip.  The GCRA
decision in Lua is the same float operations on the same doubles as
:func:`~oproxy.state.base.rate_step` (floats go in as ``repr`` and are kept
as ``%.17g``, both exact), so both stores admit the same requests.  Lua only
decides and writes; the script hands back the buckets as it found them and
Python rebuilds the headers and the refusal with the shared arithmetic.

Everything expires by itself: a rate bucket a period after it is full
again, a quota counter a minute after its period, a lease set after its
last lease.  Expiry uses Redis's relative timers, so hosts whose clocks are
a little off Redis's still agree.

A stored response is a hash (owner, expiry on the callers' clock, the
document) that expires by itself; the scripts that write or delete one
check its owner in the same step.

Circuit records are the exception: they live in one hash (so a process
reads them all with one ``HGETALL``), each value prefixed with its expiry
on the callers' clock, and are replaced by compare-and-swap: Python reads a
record, works out its successor with the breaker's own arithmetic, and a
script writes it only if nobody changed the record in between (else Python
tries again on what won).  The arithmetic is never transcribed to Lua.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, cast

from twisted.internet import defer
from zope.interface import implementer

from oproxy.resp import Arg, RedisClient, RedisError, RedisReplyError
from oproxy.state.base import (
    Admission,
    CircuitChange,
    IStateStore,
    KeyRecord,
    Lease,
    QuotaCharge,
    RateCharge,
    Refusal,
    StateUnavailable,
    StoredResponse,
)
from oproxy.state.outcomes import rate_refusal, rate_states, rate_states_unchanged, rate_steps

T = TypeVar("T")

#: Seconds a quota counter outlives its period, for late settlements.
QUOTA_GRACE = 60.0

#: Compare-and-swap rounds a circuit update may lose before giving up.  A
#: process sends one update of a circuit at a time, so its rivals are the
#: other processes, and each round one of them wins.
CIRCUIT_ATTEMPTS = 32


class Script:
    """A Lua script and the SHA1 ``EVALSHA`` knows it by."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


# The shared arithmetic, transcribed from oproxy/state/base.py literal for literal.
_GCRA = """
local function tolerance(now, interval)
  return math.min(interval / 4, 1e-6 + math.abs(now) * 1e-13)
end
local function in_use(tat, now, interval, slack)
  local ahead = math.max(tat, now) - now
  local units = ahead / interval
  local whole = math.floor(units + 0.5)
  if math.abs(units - whole) * interval <= slack then return whole * interval end
  return ahead
end
local function store_tat(key, tat, now, period)
  local ttl = math.ceil((tat - now + period) * 1000)
  redis.call('SET', key, string.format('%.17g', tat), 'PX', string.format('%d', ttl))
end
local function tidy_leases(key, now)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.17g', now))
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    local ttl = math.ceil((tonumber(last[2]) - now) * 1000) + 1000
    redis.call('PEXPIRE', key, string.format('%d', math.max(ttl, 1)))
  end
end
"""

#: KEYS: rate buckets, quota counters, lease sets.  ARGV: now, the three
#: counts, then cost, limit, period per rate; cost, limit, ttl_ms per quota;
#: lease_id, limit, expires per lease.  Returns {refusal kind or '', its
#: index, units in use, the stored tat of each rate charge or ''}.
ADMIT = Script(
    _GCRA
    + """
local now = tonumber(ARGV[1])
local nr, nq, nl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local stored, taken, writes = {}, {}, {}
local refused = nil
for i = 1, nr do
  local at = 2 + 3 * i
  local cost, limit, period = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  stored[i] = redis.call('GET', KEYS[i]) or ''
  local tat = taken[KEYS[i]] or tonumber(stored[i]) or now
  local interval = period / limit
  local slack = tolerance(now, interval)
  local after = in_use(tat, now, interval, slack) + cost * interval
  if after <= period + slack then
    taken[KEYS[i]] = now + after
    writes[#writes + 1] = {KEYS[i], now + after, period}
  elseif not refused then
    refused = {'rate', i, 0}
  end
end
local function refuse(kind, index, used)
  local reply = {kind, index, used}
  for i = 1, nr do reply[#reply + 1] = stored[i] end
  return reply
end
if refused then return refuse(refused[1], refused[2], refused[3]) end
local counters = {}
for j = 1, nq do
  local key, at = KEYS[nr + j], 2 + 3 * (nr + j)
  local used = counters[key] or tonumber(redis.call('GET', key) or '0')
  if used >= tonumber(ARGV[at + 1]) then return refuse('quota', j, used) end
  counters[key] = used + tonumber(ARGV[at])
end
local holders = {}
for k = 1, nl do
  local key, at = KEYS[nr + nq + k], 2 + 3 * (nr + nq + k)
  local id, limit = ARGV[at], tonumber(ARGV[at + 1])
  local held = holders[key]
  if not held then
    held = {ids = {}, count = 0}
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', key, '(' .. ARGV[1], '+inf')) do
      held.ids[member] = true
      held.count = held.count + 1
    end
    holders[key] = held
  end
  if not held.ids[id] then
    if held.count >= limit then return refuse('parallel', k, held.count) end
    held.ids[id] = true
    held.count = held.count + 1
  end
end
for _, write in ipairs(writes) do store_tat(write[1], write[2], now, write[3]) end
for j = 1, nq do
  local key, at = KEYS[nr + j], 2 + 3 * (nr + j)
  redis.call('INCRBY', key, ARGV[at])
  redis.call('PEXPIRE', key, ARGV[at + 2])
end
for k = 1, nl do
  local key, at = KEYS[nr + nq + k], 2 + 3 * (nr + nq + k)
  redis.call('ZADD', key, ARGV[at + 2], ARGV[at])
  tidy_leases(key, now)
end
return refuse('', 0, 0)
"""
)

#: KEYS as for ADMIT.  ARGV: now, the three counts, then cost, limit, period
#: per rate; cost, ttl_ms per quota; lease_id per released lease.
SETTLE = Script(
    _GCRA
    + """
local now = tonumber(ARGV[1])
local nr, nq, nl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local at = 5
for i = 1, nr do
  local cost, limit, period = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  at = at + 3
  local tat = tonumber(redis.call('GET', KEYS[i]) or '') or now
  local interval = period / limit
  local ahead = in_use(tat, now, interval, tolerance(now, interval))
  store_tat(KEYS[i], now + math.max(0, ahead + cost * interval), now, period)
end
for j = 1, nq do
  local key = KEYS[nr + j]
  local used = tonumber(redis.call('GET', key) or '0') + tonumber(ARGV[at])
  if used > 0 then
    redis.call('SET', key, string.format('%d', used), 'PX', ARGV[at + 1])
  else
    redis.call('DEL', key)
  end
  at = at + 2
end
for k = 1, nl do
  redis.call('ZREM', KEYS[nr + nq + k], ARGV[at])
  at = at + 1
end
return 0
"""
)

#: KEYS: lease sets.  ARGV: now, then lease_id, expires per lease.
RENEW = Script(
    _GCRA
    + """
local now = tonumber(ARGV[1])
for k = 1, #KEYS do
  local id, expires = ARGV[2 * k], ARGV[2 * k + 1]
  local score = redis.call('ZSCORE', KEYS[k], id)
  -- A lapsed lease stays lapsed: its slot may be someone else's by now.
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[k], 'XX', expires, id)
    tidy_leases(KEYS[k], now)
  end
end
return 0
"""
)

#: KEYS: the record, the index by creation, names to ids, active ids.
#: ARGV: 'add' or 'save', key_id, name, secret, created, revoked or '', policy.
PUT_KEY = Script(
    """
local record, index, names, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local mode, id, name = ARGV[1], ARGV[2], ARGV[3]
local exists = redis.call('EXISTS', record) == 1
if mode == 'add' and exists then return 'id' end
if mode == 'save' and not exists then return 'missing' end
local holder = redis.call('HGET', names, name)
if holder and holder ~= id then return 'name' end
if exists then
  local old = redis.call('HGET', record, 'name')
  if old and old ~= name then redis.call('HDEL', names, old) end
end
redis.call('HSET', record, 'key_id', id, 'name', name, 'secret_sha256', ARGV[4],
  'created', ARGV[5], 'revoked', ARGV[6], 'policy', ARGV[7])
redis.call('HSET', names, name, id)
redis.call('ZADD', index, ARGV[5], id)
if ARGV[6] == '' then redis.call('SADD', active, id) else redis.call('SREM', active, id) end
return 'ok'
"""
)


#: KEYS: the circuit hash.  ARGV: name, the stored value expected ('' for
#: none), the value to store ('' to delete), now.  Returns 1 when swapped, 0
#: when the record was not what the caller read.  Records expired at ``now``
#: are swept on the way.
SWAP_CIRCUIT = Script(
    """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
local now = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], '^(%S+)'))
  if expires == nil or expires <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
return 1
"""
)


#: KEYS: the response, then the responses whose life to extend.  ARGV:
#: owner, expires (callers' clock), document, ttl_ms.
PUT_RESPONSE = Script(
    """
local owner, expires, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', owner, 'expires', expires, 'document', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'owner') == owner then
    if redis.call('PTTL', KEYS[i]) < ttl then
      redis.call('PEXPIRE', KEYS[i], ttl)
      redis.call('HSET', KEYS[i], 'expires', expires)
    end
  end
end
return 0
"""
)

#: KEYS: the response.  ARGV: owner, now.  Returns 1 when deleted.
DELETE_RESPONSE = Script(
    """
local found = redis.call('HMGET', KEYS[1], 'owner', 'expires')
if found[1] ~= ARGV[1] or not found[2] then return 0 end
if tonumber(found[2]) <= tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
)


@implementer(IStateStore)
class RedisStateStore:
    """
    Keys and limits in Redis, shared by every process of every host.

    :param client: the connection to use; :meth:`close` closes it.
    :param namespace: prefix of every Redis key, so several deployments (or
        tests) can share a server.
    """

    def __init__(self, client: RedisClient, *, namespace: str = "oproxy:") -> None:
        self._client = client
        self.namespace = namespace
        #: One update of a circuit at a time from this process (see ``CIRCUIT_ATTEMPTS``).
        self._circuit_locks: dict[str, defer.DeferredLock] = {}

    # -- limits ------------------------------------------------------------------

    def admit(
        self,
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        leases: Sequence[Lease],
        now: float,
    ) -> defer.Deferred[Admission]:
        return self._guard(self._admit(rates, quotas, leases, now))

    async def _admit(
        self,
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        leases: Sequence[Lease],
        now: float,
    ) -> Admission:
        args: list[Arg] = [repr(float(now)), len(rates), len(quotas), len(leases)]
        for charge in rates:
            args += [charge.cost, charge.limit, repr(float(charge.period))]
        for quota in quotas:
            args += [quota.cost, quota.limit, _ttl_ms(quota.period_end + QUOTA_GRACE - now)]
        for lease in leases:
            args += [lease.lease_id, lease.limit, repr(float(lease.expires))]
        keys = self._limit_keys(rates, quotas, leases)
        kind, index, used, *tats = await self._run(ADMIT, keys, args)
        stored = [float(tat) if tat else None for tat in tats]
        if not kind:
            steps = rate_steps(rates, stored, now)
            return Admission(None, rate_states(rates, steps))
        refusal: Refusal | None
        if kind == b"rate":
            refusal = rate_refusal(rates, rate_steps(rates, stored, now))
            if refusal is None:  # the Lua transcription of rate_step has drifted
                raise StateUnavailable("the Redis admit script and rate_step disagree")
        elif kind == b"quota":
            quota = quotas[index - 1]
            refusal = Refusal("quota", quota.bucket, quota.limit, used, quota.cost)
        else:
            lease = leases[index - 1]
            refusal = Refusal("parallel", lease.bucket, lease.limit, used, 1)
        return Admission(refusal, rate_states_unchanged(rates, stored, now))

    def settle(
        self,
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        released: Sequence[Lease],
        now: float,
    ) -> defer.Deferred[None]:
        args: list[Arg] = [repr(float(now)), len(rates), len(quotas), len(released)]
        for charge in rates:
            args += [charge.cost, charge.limit, repr(float(charge.period))]
        for quota in quotas:
            args += [quota.cost, _ttl_ms(quota.period_end + QUOTA_GRACE - now)]
        args += [lease.lease_id for lease in released]
        keys = self._limit_keys(rates, quotas, released)
        return self._guard(self._run_for_nothing(SETTLE, keys, args))

    def renew(self, leases: Sequence[Lease], now: float) -> defer.Deferred[None]:
        args: list[Arg] = [repr(float(now))]
        for lease in leases:
            args += [lease.lease_id, repr(float(lease.expires))]
        keys = [self._key("lease:", lease.bucket) for lease in leases]
        return self._guard(self._run_for_nothing(RENEW, keys, args))

    def quota_used(self, bucket: str) -> defer.Deferred[int]:
        async def read() -> int:
            used = await self._client.execute("GET", self._key("quota:", bucket))
            return int(used) if used is not None else 0

        return self._guard(read())

    def _limit_keys(
        self, rates: Sequence[RateCharge], quotas: Sequence[QuotaCharge], leases: Sequence[Lease]
    ) -> list[str]:
        return [
            *(self._key("rate:", charge.bucket) for charge in rates),
            *(self._key("quota:", quota.bucket) for quota in quotas),
            *(self._key("lease:", lease.bucket) for lease in leases),
        ]

    # -- circuits ------------------------------------------------------------------

    def update_circuit(
        self, name: str, change: CircuitChange, now: float
    ) -> defer.Deferred[str | None]:
        async def update() -> str | None:
            lock = self._circuit_locks.setdefault(name, defer.DeferredLock())
            await lock.acquire()
            try:
                return await swap()
            finally:
                lock.release()
                if not lock.locked and not lock.waiting:
                    del self._circuit_locks[name]

        async def swap() -> str | None:
            key = self._key("circuits")
            for _ in range(CIRCUIT_ATTEMPTS):
                stored = await self._client.execute("HGET", key, name)
                record = change(_live_circuit(stored, now))
                replacement = "" if record is None else f"{record.expires!r} {record.value}"
                expected = stored if stored is not None else b""
                swapped = await self._run(
                    SWAP_CIRCUIT, [key], [name, expected, replacement, repr(float(now))]
                )
                if swapped:
                    return None if record is None else record.value
            raise StateUnavailable(
                f"the circuit {name!r} changed under every one of {CIRCUIT_ATTEMPTS} attempts"
            )

        return self._guard(update())

    def circuits(self, now: float) -> defer.Deferred[dict[str, str]]:
        async def read() -> dict[str, str]:
            reply = await self._client.execute("HGETALL", self._key("circuits"))
            found = {}
            for name, stored in zip(reply[::2], reply[1::2], strict=True):
                value = _live_circuit(stored, now)
                if value is not None:
                    found[name.decode()] = value
            return found

        return self._guard(read())

    # -- stored responses ----------------------------------------------------------

    def put_response(
        self, record: StoredResponse, extend: Sequence[str], now: float
    ) -> defer.Deferred[None]:
        keys = [self._key("response:", record.response_id)]
        keys += [self._key("response:", response_id) for response_id in extend]
        args: list[Arg] = [
            record.owner,
            repr(float(record.expires)),
            record.document,
            _ttl_ms(record.expires - now),
        ]
        return self._guard(self._run_for_nothing(PUT_RESPONSE, keys, args))

    def get_responses(
        self, response_ids: Sequence[str], owner: str, now: float
    ) -> defer.Deferred[dict[str, StoredResponse]]:
        async def get() -> dict[str, StoredResponse]:
            # Pipelined: every HMGET goes out before the first reply is read.
            replies = await defer.gatherResults(
                [
                    self._command(
                        "HMGET", self._key("response:", response_id), "owner", "expires", "document"
                    )
                    for response_id in response_ids
                ],
                consumeErrors=True,
            )
            found: dict[str, StoredResponse] = {}
            for response_id, (stored_owner, expires, document) in zip(
                response_ids, replies, strict=True
            ):
                if stored_owner is None or expires is None or document is None:
                    continue
                if stored_owner.decode() != owner or float(expires) <= now:
                    continue
                found[response_id] = StoredResponse(
                    response_id, owner, float(expires), document.decode()
                )
            return found

        return self._guard(get())

    def delete_response(self, response_id: str, owner: str, now: float) -> defer.Deferred[bool]:
        async def delete() -> bool:
            deleted = await self._run(
                DELETE_RESPONSE, [self._key("response:", response_id)], [owner, repr(float(now))]
            )
            return bool(deleted)

        return self._guard(delete())

    # -- keys ----------------------------------------------------------------------

    def add_key(self, record: KeyRecord) -> defer.Deferred[None]:
        return self._guard(self._put_key("add", record))

    def save_key(self, record: KeyRecord) -> defer.Deferred[None]:
        return self._guard(self._put_key("save", record))

    async def _put_key(self, mode: str, record: KeyRecord) -> None:
        keys = [
            self._key("key:", record.key_id),
            self._key("keys"),
            self._key("key-names"),
            self._key("keys-active"),
        ]
        args: list[Arg] = [
            mode,
            record.key_id,
            record.name,
            bytes(record.secret_sha256),
            repr(float(record.created)),
            "" if record.revoked is None else repr(float(record.revoked)),
            json.dumps(record.policy, separators=(",", ":"), sort_keys=True),
        ]
        outcome = await self._run(PUT_KEY, keys, args)
        if outcome == b"id":
            raise ValueError(f"a key with id {record.key_id!r} exists")
        if outcome == b"name":
            raise ValueError(f"a key named {record.name!r} exists")
        if outcome == b"missing":
            raise KeyError(f"no key with id {record.key_id!r}")

    def get_key(self, key_id: str) -> defer.Deferred[KeyRecord | None]:
        async def get() -> KeyRecord | None:
            return _key_record(await self._client.execute("HGETALL", self._key("key:", key_id)))

        return self._guard(get())

    def list_keys(self) -> defer.Deferred[list[KeyRecord]]:
        async def list_all() -> list[KeyRecord]:
            ids = await self._client.execute("ZRANGE", self._key("keys"), 0, -1)
            # Pipelined: every HGETALL goes out before the first reply is read.
            fields = await defer.gatherResults(
                [self._command("HGETALL", self._key("key:", key_id.decode())) for key_id in ids],
                consumeErrors=True,
            )
            return [record for record in map(_key_record, fields) if record is not None]

        return self._guard(list_all())

    def has_active_keys(self) -> defer.Deferred[bool]:
        async def any_active() -> bool:
            return bool(await self._client.execute("SCARD", self._key("keys-active")))

        return self._guard(any_active())

    # -- the connection --------------------------------------------------------

    def ping(self) -> defer.Deferred[None]:
        async def ping() -> None:
            await self._client.execute("PING")

        return self._guard(ping())

    def close(self) -> defer.Deferred[None]:
        return self._client.close()

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.namespace}{kind}{name}"

    def _command(self, *args: Arg) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._client.execute(*args))

    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run a script by its SHA1, sending its source only to a server that lacks it."""
        try:
            return await self._client.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as e:
            if e.code != "NOSCRIPT":
                raise
        return await self._client.execute("EVAL", script.source, len(keys), *keys, *args)

    async def _run_for_nothing(
        self, script: Script, keys: Sequence[str], args: Sequence[Arg]
    ) -> None:
        await self._run(script, keys, args)

    def _guard(self, work: Coroutine[Any, Any, T]) -> defer.Deferred[T]:
        """Run ``work``; Redis failing in any way becomes ``StateUnavailable``."""

        async def guarded() -> T:
            try:
                return await work
            except defer.FirstError as e:  # from a pipelined batch
                error = e.subFailure.value
                if isinstance(error, RedisError):
                    raise self._unavailable(error) from error
                raise
            except RedisError as e:
                raise self._unavailable(e) from e

        return defer.Deferred.fromCoroutine(guarded())

    def _unavailable(self, error: RedisError) -> StateUnavailable:
        address = self._client.address
        return StateUnavailable(f"the Redis state store at {address} is unavailable: {error}")


def _ttl_ms(seconds: float) -> int:
    """Milliseconds for ``PEXPIRE``, which wants a positive whole number."""
    return max(1, math.ceil(seconds * 1000))


def _live_circuit(stored: bytes | None, now: float) -> str | None:
    """A circuit's value from its stored form, ``expires value``; ``None`` once expired."""
    if stored is None:
        return None
    expires, _, value = stored.decode().partition(" ")
    try:
        live = float(expires) > now
    except ValueError:
        return None  # not ours to read: treated as absent, and swept by the next write
    return value if live else None


def _key_record(reply: list[bytes]) -> KeyRecord | None:
    """A key from its ``HGETALL`` reply (an empty one: no such key)."""
    if not reply:
        return None
    fields = dict(zip(reply[::2], reply[1::2], strict=True))
    revoked = fields[b"revoked"]
    return KeyRecord(
        key_id=fields[b"key_id"].decode(),
        name=fields[b"name"].decode(),
        secret_sha256=fields[b"secret_sha256"],
        created=float(fields[b"created"]),
        policy=cast(dict[str, object], json.loads(fields[b"policy"])),
        revoked=float(revoked) if revoked else None,
    )
