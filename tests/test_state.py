"""
The state stores against one contract: every contract test runs on SQLite
(a fresh file in ``tmp_path``) and on Redis (a real ``redis-server``, a fresh
namespace per test).  Then what only one store has: files and locks for
SQLite, expiry and scripts for Redis, and exactness under real concurrency
from several OS processes for both.  The GCRA arithmetic itself is pure and
gets property tests at the end.

Time is the ``now`` each call is given, at wall-clock magnitude (1.7e9), where
float rounding is coarsest.
"""

from __future__ import annotations

import math
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor

from oproxy.resp import RedisClient
from oproxy.state.base import (
    Admission,
    CircuitRecord,
    IStateStore,
    KeyRecord,
    Lease,
    QuotaCharge,
    RateCharge,
    RateState,
    Refusal,
    StateUnavailable,
    StoredResponse,
    fit_tolerance,
    rate_settle,
    rate_step,
)
from oproxy.state.redis import ADMIT, RedisStateStore
from oproxy.state.sqlite import SQLiteStore
from tests import redisserver
from tests.redisserver import RedisServer, free_port

#: The module's server; a plain name, so test parameters may take it.
redis_server = redisserver.redis_server

NOW = 1_700_000_000.25
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Backend:
    """One kind of store; :meth:`open` gives another store over the same state."""

    kind: str
    opener: Callable[..., IStateStore]
    opened: list[IStateStore]

    def open(self, **options: Any) -> IStateStore:
        store = self.opener(**options)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opener: Callable[..., IStateStore]
    if request.param == "sqlite":
        path = tmp_path / "state" / "oproxy.db"

        def opener(**options: Any) -> IStateStore:
            return SQLiteStore(path, **options)

    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        namespace = f"test:{uuid.uuid4().hex}:"

        def opener(**options: Any) -> IStateStore:
            return RedisStateStore(RedisClient(reactor, server.url, **options), namespace=namespace)

    made = Backend(request.param, opener, [])
    yield made
    for store in made.opened:
        pytest_twisted.blockon(store.close())


@pytest.fixture
def store(backend: Backend) -> IStateStore:
    return backend.open()


def per_minute(limit: int, bucket: str = "r", cost: int = 1) -> RateCharge:
    return RateCharge(bucket, "requests", cost, limit, 60.0)


def tokens(cost: int, limit: int = 100, bucket: str = "t") -> RateCharge:
    return RateCharge(bucket, "tokens", cost, limit, 60.0)


async def admit(
    store: IStateStore,
    rates: list[RateCharge] | None = None,
    quotas: list[QuotaCharge] | None = None,
    leases: list[Lease] | None = None,
    now: float = NOW,
) -> Admission:
    outcome: Admission = await store.admit(rates or [], quotas or [], leases or [], now)
    return outcome


# -- rate limits ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_burst_admits_exactly_the_limit(store: IStateStore) -> None:
    outcomes = [await admit(store, [per_minute(7)]) for _ in range(21)]
    assert [o.admitted for o in outcomes] == [True] * 7 + [False] * 14
    assert [o.rates[0].remaining for o in outcomes[:7]] == [6, 5, 4, 3, 2, 1, 0]
    assert outcomes[0].rates[0].reset == pytest.approx(60 / 7)
    assert outcomes[6].rates[0].reset == pytest.approx(60.0)
    refused = outcomes[7]
    assert refused.refusal is not None
    assert replace(refused.refusal, retry_after=None) == Refusal(
        "rate", "r", 7, 7, 1, family="requests"
    )
    assert refused.refusal.retry_after == pytest.approx(60 / 7)
    # The headers of a 429 still describe the bucket.
    assert refused.rates == (RateState("r", "requests", 7, 0, pytest.approx(60.0)),)


@pytest_twisted.ensureDeferred
async def test_a_bucket_refills_one_unit_per_interval(store: IStateStore) -> None:
    for _ in range(7):
        assert (await admit(store, [per_minute(7)])).admitted
    refused = await admit(store, [per_minute(7)])
    assert refused.refusal is not None and refused.refusal.retry_after is not None
    retry_at = NOW + refused.refusal.retry_after
    early = await admit(store, [per_minute(7)], now=retry_at - 0.01)
    assert early.refusal is not None
    assert early.refusal.retry_after == pytest.approx(0.01, abs=1e-6)
    assert (await admit(store, [per_minute(7)], now=retry_at)).admitted
    assert not (await admit(store, [per_minute(7)], now=retry_at)).admitted
    # A full period later the whole burst is back.
    later = [await admit(store, [per_minute(7)], now=retry_at + 60) for _ in range(8)]
    assert [o.admitted for o in later] == [True] * 7 + [False]


@pytest_twisted.ensureDeferred
async def test_a_charge_above_the_limit_is_refused_for_good(store: IStateStore) -> None:
    refused = await admit(store, [tokens(101)])
    assert refused.refusal == Refusal("rate", "t", 100, 0, 101, family="tokens", retry_after=None)
    assert refused.rates == (RateState("t", "tokens", 100, 100, 0.0),)
    assert (await admit(store, [tokens(100)])).admitted  # it charged nothing


@pytest_twisted.ensureDeferred
async def test_a_refusal_changes_nothing(store: IStateStore) -> None:
    assert (await admit(store, [per_minute(1, "narrow")])).admitted
    parallel = Lease("slots", "held", 1, NOW + 30)
    assert (await admit(store, leases=[parallel])).admitted
    quota = QuotaCharge("daily", 5, 100, NOW + 3600)
    wide = per_minute(3, "wide")

    refused = await admit(store, [wide, per_minute(1, "narrow")], [quota])
    assert refused.refusal is not None and refused.refusal.bucket == "narrow"
    assert [state.remaining for state in refused.rates] == [3, 0]
    refused = await admit(store, [wide], [quota], [Lease("slots", "other", 1, NOW + 30)])
    assert refused.refusal == Refusal("parallel", "slots", 1, 1, 1)
    assert refused.rates == (RateState("wide", "requests", 3, 3, 0.0),)

    assert await store.quota_used("daily") == 0
    burst = [await admit(store, [wide]) for _ in range(4)]
    assert [o.admitted for o in burst] == [True, True, True, False]


@pytest_twisted.ensureDeferred
async def test_a_bucket_named_twice_is_charged_twice(store: IStateStore) -> None:
    twice = await admit(store, [tokens(30), tokens(30)])
    assert [state.remaining for state in twice.rates] == [70, 40]
    refused = await admit(store, [tokens(30), tokens(30)])
    # The first of the two fits (60 + 30); the second finds 90 in use.
    assert refused.refusal is not None and refused.refusal.used == 90
    assert refused.refusal.retry_after == pytest.approx(12.0)
    assert [state.remaining for state in refused.rates] == [40, 40]


@pytest_twisted.ensureDeferred
async def test_settle_refunds_and_debts(store: IStateStore) -> None:
    assert (await admit(store, [tokens(100)])).rates[0].remaining == 0
    await store.settle([tokens(-40)], [], [], NOW)  # the answer was shorter than reserved
    assert (await admit(store, [tokens(40)])).admitted
    assert not (await admit(store, [tokens(1)])).admitted

    await store.settle([tokens(50)], [], [], NOW)  # and this one longer: 150 tokens taken
    refused = await admit(store, [tokens(1)])
    assert refused.refusal is not None
    assert refused.refusal.used == 100
    assert refused.refusal.retry_after == pytest.approx((150 + 1 - 100) * 0.6)
    assert refused.rates[0].reset == pytest.approx(90.0)
    assert not (await admit(store, [tokens(1)], now=NOW + 30.5)).admitted
    assert (await admit(store, [tokens(1)], now=NOW + 30.6)).admitted

    await store.settle([tokens(-1000)], [], [], NOW + 31)  # never fuller than full
    assert (await admit(store, [tokens(100)], now=NOW + 31)).admitted
    assert not (await admit(store, [tokens(1)], now=NOW + 31)).admitted


# -- quotas ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_quota_admits_while_anything_is_left(store: IStateStore) -> None:
    today = QuotaCharge("alice:2024-05-01", 1, 3, NOW + 3600)
    assert [(await admit(store, quotas=[today])).admitted for _ in range(3)] == [True] * 3
    assert await store.quota_used(today.bucket) == 3
    refused = await admit(store, quotas=[today])
    assert refused.refusal == Refusal("quota", today.bucket, 3, 3, 1)
    assert await store.quota_used(today.bucket) == 3

    tomorrow = replace(today, bucket="alice:2024-05-02", period_end=NOW + 86400)
    assert (await admit(store, quotas=[tomorrow], now=NOW + 3700)).admitted
    # Below the limit a large reservation still passes; it is settled later.
    big = replace(tomorrow, cost=500)
    assert (await admit(store, quotas=[big], now=NOW + 3700)).admitted
    assert await store.quota_used(tomorrow.bucket) == 501


@pytest_twisted.ensureDeferred
async def test_quota_corrections_never_go_below_zero(store: IStateStore) -> None:
    month = QuotaCharge("m", 100, 1000, NOW + 3600)
    assert (await admit(store, quotas=[month])).admitted
    await store.settle([], [replace(month, cost=-30)], [], NOW)
    assert await store.quota_used("m") == 70
    await store.settle([], [replace(month, cost=-500)], [], NOW)
    assert await store.quota_used("m") == 0
    await store.settle([], [replace(month, cost=25)], [], NOW)
    assert await store.quota_used("m") == 25
    assert await store.quota_used("never-used") == 0


# -- parallel leases ----------------------------------------------------------------


def lease(lease_id: str, expires: float = NOW + 30, limit: int = 2) -> Lease:
    return Lease("p", lease_id, limit, expires)


@pytest_twisted.ensureDeferred
async def test_leases_limit_parallel_requests(store: IStateStore) -> None:
    assert (await admit(store, leases=[lease("a")])).admitted
    assert (await admit(store, leases=[lease("b")])).admitted
    refused = await admit(store, leases=[lease("c")])
    assert refused.refusal == Refusal("parallel", "p", 2, 2, 1, retry_after=None)
    assert (await admit(store, leases=[lease("a")])).admitted  # already holding it

    await store.settle([], [], [lease("a")], NOW + 1)
    assert (await admit(store, leases=[lease("c")], now=NOW + 1)).admitted
    assert not (await admit(store, leases=[lease("d")], now=NOW + 1)).admitted


@pytest_twisted.ensureDeferred
async def test_a_lease_lapses_unless_renewed(store: IStateStore) -> None:
    assert (await admit(store, leases=[lease("kept", NOW + 10)])).admitted
    assert (await admit(store, leases=[lease("dropped", NOW + 10)])).admitted
    await store.renew([lease("kept", NOW + 100)], NOW + 5)
    assert (await admit(store, leases=[lease("new", NOW + 100)], now=NOW + 10.5)).admitted
    assert not (await admit(store, leases=[lease("late", NOW + 100)], now=NOW + 50)).admitted

    # A lapsed lease is not revived: its slot went to "new".
    await store.renew([lease("dropped", NOW + 200)], NOW + 60)
    assert not (await admit(store, leases=[lease("late", NOW + 200)], now=NOW + 60)).admitted
    assert (await admit(store, leases=[lease("late", NOW + 200)], now=NOW + 100.5)).admitted


# -- keys -------------------------------------------------------------------------------


def key(key_id: str, name: str, created: float = NOW, **changes: Any) -> KeyRecord:
    secret = bytes(range(32)) + b"\x00\xff"
    return replace(
        KeyRecord(key_id, name, secret, created, {"models": ["llama3*"], "rpm": 60}), **changes
    )


@pytest_twisted.ensureDeferred
async def test_keys(store: IStateStore) -> None:
    assert not await store.has_active_keys()
    assert await store.list_keys() == []
    await store.add_key(key("k2", "bob", NOW + 1))
    await store.add_key(key("k1", "alice", NOW + 0.5))
    await store.add_key(key("k0", "carol", NOW + 1))
    assert await store.has_active_keys()
    assert await store.get_key("k1") == key("k1", "alice", NOW + 0.5)
    assert await store.get_key("nope") is None
    assert [k.key_id for k in await store.list_keys()] == ["k1", "k0", "k2"]

    with pytest.raises(ValueError, match="'k1'"):
        await store.add_key(key("k1", "dave"))
    with pytest.raises(ValueError, match="'alice'"):
        await store.add_key(key("k3", "alice"))
    assert len(await store.list_keys()) == 3

    revoked = key("k1", "alice", NOW + 0.5, revoked=NOW + 9, policy={})
    await store.save_key(revoked)
    assert await store.get_key("k1") == revoked
    await store.save_key(key("k2", "bob", NOW + 1, revoked=NOW + 9))
    assert await store.has_active_keys()
    await store.save_key(key("k0", "carol", NOW + 1, revoked=NOW + 9))
    assert not await store.has_active_keys()
    assert len(await store.list_keys()) == 3


@pytest_twisted.ensureDeferred
async def test_saving_a_key_keeps_names_unique(store: IStateStore) -> None:
    await store.add_key(key("k1", "alice"))
    await store.add_key(key("k2", "bob"))
    with pytest.raises(ValueError, match="'bob'"):
        await store.save_key(key("k1", "bob"))
    with pytest.raises(KeyError, match="'k9'"):
        await store.save_key(key("k9", "zoe"))
    await store.save_key(key("k1", "alice-2"))
    await store.add_key(key("k3", "alice"))  # the old name is free again
    assert [k.name for k in await store.list_keys()] == ["alice-2", "bob", "alice"]
    assert await store.get_key("k9") is None


# -- circuits -----------------------------------------------------------------------


def counting(expires: float = NOW + 30) -> Callable[[str | None], CircuitRecord | None]:
    """A change that counts up from nothing (a plain integer value)."""

    def change(value: str | None) -> CircuitRecord:
        return CircuitRecord(str(int(value or 0) + 1), expires)

    return change


@pytest_twisted.ensureDeferred
async def test_a_circuit_record_is_replaced_read_and_dropped(store: IStateStore) -> None:
    assert await store.circuits(NOW) == {}
    seen: list[str | None] = []

    def look(value: str | None) -> CircuitRecord | None:
        seen.append(value)
        return CircuitRecord("first", NOW + 30)

    assert await store.update_circuit('["a",""]', look, NOW) == "first"
    assert await store.update_circuit('["a","m:latest"]', counting(), NOW) == "1"
    assert await store.update_circuit('["a","m:latest"]', counting(), NOW) == "2"
    assert seen == [None]  # nothing was there before
    assert await store.circuits(NOW) == {'["a",""]': "first", '["a","m:latest"]': "2"}
    assert await store.update_circuit('["a",""]', lambda value: None, NOW) is None
    assert await store.circuits(NOW) == {'["a","m:latest"]': "2"}


@pytest_twisted.ensureDeferred
async def test_an_expired_circuit_record_is_gone(store: IStateStore) -> None:
    await store.update_circuit("short", counting(NOW + 10), NOW)
    await store.update_circuit("long", counting(NOW + 100), NOW)
    assert set(await store.circuits(NOW + 9.5)) == {"short", "long"}
    assert set(await store.circuits(NOW + 10)) == {"long"}
    # An update sees an expired record as none, and starts again.
    assert await store.update_circuit("short", counting(NOW + 30), NOW + 20) == "1"


@pytest_twisted.ensureDeferred
async def test_a_change_that_fails_changes_nothing(store: IStateStore) -> None:
    await store.update_circuit("c", counting(), NOW)

    def broken(value: str | None) -> CircuitRecord:
        raise RuntimeError("not today")

    with pytest.raises(RuntimeError):
        await store.update_circuit("c", broken, NOW)
    assert await store.circuits(NOW) == {"c": "1"}


@pytest_twisted.ensureDeferred
async def test_concurrent_circuit_updates_are_exact(backend: Backend) -> None:
    """Every update in flight at once, over several connections: none is lost."""
    stores = [backend.open() for _ in range(PROCESSES)]
    calls = [stores[i % PROCESSES].update_circuit("race", counting(), NOW) for i in range(40)]
    results = await defer.gatherResults(calls)
    assert sorted(int(r) for r in results) == list(range(1, 41))
    assert await stores[0].circuits(NOW) == {"race": "40"}


# -- stored responses ---------------------------------------------------------------


def stored(response_id: str, owner: str = "key:a", expires: float = NOW + 60) -> StoredResponse:
    return StoredResponse(response_id, owner, expires, f'{{"id": "{response_id}"}}')


@pytest_twisted.ensureDeferred
async def test_a_response_is_kept_for_its_owner_only(store: IStateStore) -> None:
    await store.put_response(stored("resp_1"), [], NOW)
    await store.put_response(stored("resp_2", owner="key:b"), [], NOW)
    assert await store.get_responses(["resp_1", "resp_2", "resp_9"], "key:a", NOW) == {
        "resp_1": stored("resp_1")
    }
    assert list(await store.get_responses(["resp_1", "resp_2"], "key:b", NOW)) == ["resp_2"]
    assert await store.get_responses([], "key:a", NOW) == {}
    # Kept again under the same id: replaced.
    replacement = StoredResponse("resp_1", "key:a", NOW + 60, '{"id": "resp_1", "v": 2}')
    await store.put_response(replacement, [], NOW)
    assert await store.get_responses(["resp_1"], "key:a", NOW) == {"resp_1": replacement}


@pytest_twisted.ensureDeferred
async def test_a_response_expires(store: IStateStore) -> None:
    await store.put_response(stored("resp_1", expires=NOW + 10), [], NOW)
    assert list(await store.get_responses(["resp_1"], "key:a", NOW + 9.5)) == ["resp_1"]
    assert await store.get_responses(["resp_1"], "key:a", NOW + 10) == {}
    assert not await store.delete_response("resp_1", "key:a", NOW + 10)


@pytest_twisted.ensureDeferred
async def test_only_the_owner_deletes_a_response(store: IStateStore) -> None:
    await store.put_response(stored("resp_1"), [], NOW)
    assert not await store.delete_response("resp_1", "key:b", NOW)
    assert list(await store.get_responses(["resp_1"], "key:a", NOW)) == ["resp_1"]
    assert await store.delete_response("resp_1", "key:a", NOW)
    assert not await store.delete_response("resp_1", "key:a", NOW)
    assert await store.get_responses(["resp_1"], "key:a", NOW) == {}


@pytest_twisted.ensureDeferred
async def test_a_chained_response_keeps_its_history_alive(store: IStateStore) -> None:
    await store.put_response(stored("resp_1", expires=NOW + 10), [], NOW)
    await store.put_response(stored("resp_other", owner="key:b", expires=NOW + 10), [], NOW)
    await store.put_response(stored("resp_long", expires=NOW + 500), [], NOW)
    # resp_2 chains onto resp_1 (and names another owner's and a longer one).
    await store.put_response(
        stored("resp_2", expires=NOW + 100), ["resp_1", "resp_other", "resp_long"], NOW + 5
    )
    later = await store.get_responses(["resp_1", "resp_2", "resp_long"], "key:a", NOW + 50)
    assert sorted(later) == ["resp_1", "resp_2", "resp_long"]
    assert later["resp_1"].expires == NOW + 100
    assert later["resp_long"].expires == NOW + 500  # never shortened
    assert await store.get_responses(["resp_other"], "key:b", NOW + 50) == {}


@pytest_twisted.ensureDeferred
async def test_many_responses_are_read_at_once(store: IStateStore) -> None:
    ids = [f"resp_{number}" for number in range(1200)]
    for response_id in ids:
        await store.put_response(stored(response_id), [], NOW)
    found = await store.get_responses([*ids, "resp_missing"], "key:a", NOW)
    assert sorted(found) == sorted(ids)
    await store.put_response(stored("resp_last", expires=NOW + 900), ids, NOW)
    assert {r.expires for r in (await store.get_responses(ids, "key:a", NOW)).values()} == {
        NOW + 900
    }


# -- failure ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def unreachable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IStateStore]:
    store: IStateStore
    if request.param == "sqlite":
        (tmp_path / "a-file").write_text("not a directory")
        store = SQLiteStore(tmp_path / "a-file" / "oproxy.db")
    else:
        client = RedisClient(reactor, f"redis://127.0.0.1:{free_port()}", connect_timeout=1)
        store = RedisStateStore(client)
    yield store
    pytest_twisted.blockon(store.close())


@pytest_twisted.ensureDeferred
async def test_an_unreachable_store_fails_fast(unreachable: IStateStore) -> None:
    calls: list[Callable[[], defer.Deferred[Any]]] = [
        unreachable.ping,
        lambda: unreachable.admit([per_minute(1)], [], [], NOW),
        lambda: unreachable.settle([per_minute(1)], [], [], NOW),
        lambda: unreachable.renew([lease("a")], NOW),
        lambda: unreachable.quota_used("q"),
        lambda: unreachable.add_key(key("k", "n")),
        lambda: unreachable.save_key(key("k", "n")),
        lambda: unreachable.get_key("k"),
        lambda: unreachable.update_circuit("c", counting(), NOW),
        lambda: unreachable.circuits(NOW),
        lambda: unreachable.put_response(stored("r"), ["q"], NOW),
        lambda: unreachable.get_responses(["r"], "key:a", NOW),
        lambda: unreachable.delete_response("r", "key:a", NOW),
        unreachable.list_keys,
        unreachable.has_active_keys,
    ]
    started = time.monotonic()
    for call in calls:
        with pytest.raises(StateUnavailable, match="unavailable"):
            await call()
    assert time.monotonic() - started < 2


@pytest_twisted.ensureDeferred
async def test_a_closed_store_fails(store: IStateStore) -> None:
    await store.ping()
    await store.close()
    with pytest.raises(StateUnavailable, match="closed"):
        await admit(store, [per_minute(1)])


# -- SQLite only --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sqlite_makes_a_private_wal_database(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "oproxy.db"
    store = SQLiteStore(path)
    assert not path.parent.exists()  # nothing happens before the first call
    await store.ping()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (3,)


@pytest_twisted.ensureDeferred
async def test_sqlite_waits_busy_timeout_for_a_lock_then_fails(tmp_path: Path) -> None:
    path = tmp_path / "oproxy.db"
    store = SQLiteStore(path, busy_timeout=0.1)
    await store.ping()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another worker, stuck holding the write lock
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="locked"):
            await admit(store, [per_minute(1)])
        assert 0.09 < time.monotonic() - started < 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await admit(store, [per_minute(1)])).admitted
    await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "oproxy.db"
    path.write_bytes(b"definitely not SQLite " * 100)
    store = SQLiteStore(path)
    with pytest.raises(StateUnavailable, match=r"oproxy\.db"):
        await store.ping()


@pytest_twisted.ensureDeferred
async def test_sqlite_recovers_when_the_path_becomes_usable(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("in the way")
    store = SQLiteStore(blocker / "oproxy.db")
    with pytest.raises(StateUnavailable):
        await store.ping()
    blocker.unlink()
    await store.ping()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_forgets_what_has_expired(tmp_path: Path) -> None:
    path = tmp_path / "oproxy.db"
    store = SQLiteStore(path)
    quota = QuotaCharge("old-period", 1, 10, NOW + 10)
    assert (await admit(store, [per_minute(5)], [quota], [lease("a", NOW + 10)])).admitted
    later = NOW + 3600
    assert (await admit(store, [per_minute(5, "other")], now=later)).admitted
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT bucket FROM rate_buckets").fetchall() == [("other",)]
        assert db.execute("SELECT count(*) FROM quota_counters").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM leases").fetchone() == (0,)
    await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_forgets_expired_responses(tmp_path: Path) -> None:
    path = tmp_path / "oproxy.db"
    store = SQLiteStore(path)
    await store.put_response(stored("resp_old", expires=NOW + 10), [], NOW)
    await store.put_response(stored("resp_new", expires=NOW + 7200), [], NOW + 3600)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT response_id FROM responses").fetchall() == [("resp_new",)]
    await store.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_adds_the_responses_table_to_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "oproxy.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE keys (key_id TEXT PRIMARY KEY)")
        db.execute("PRAGMA user_version = 2")
    store = SQLiteStore(path)
    await store.put_response(stored("resp_1"), [], NOW)
    assert list(await store.get_responses(["resp_1"], "key:a", NOW)) == ["resp_1"]
    await store.close()


# -- exactness across processes ----------------------------------------------------

#: Hammers one rate bucket and one quota at a fixed instant; prints how many passed.
SQLITE_WORKER = """
import sys, time
from pathlib import Path
from oproxy.state.base import QuotaCharge, RateCharge
from oproxy.state.sqlite import SQLiteStore

path, go, attempts, limit, now = sys.argv[1], Path(sys.argv[2]), *sys.argv[3:]
attempts, limit, now = int(attempts), int(limit), float(now)
while not go.exists():
    time.sleep(0.001)
store = SQLiteStore(path, busy_timeout=30)
rate = RateCharge("race", "requests", 1, limit)
quota = QuotaCharge("race", 1, limit, now + 3600)
passed = [0, 0]
for _ in range(attempts):
    calls = store.admit([rate], [], [], now), store.admit([], [quota], [], now)
    for which, outcome in enumerate(calls):
        results = []
        outcome.addBoth(results.append)
        if not hasattr(results[0], "admitted"):
            results[0].raiseException()
        passed[which] += results[0].admitted
print(*passed)
"""

#: The same over Redis, every attempt of a process pipelined on its connection.
REDIS_WORKER = """
import sys, time
from pathlib import Path
from twisted.internet import defer, task
from oproxy.resp import RedisClient
from oproxy.state.base import RateCharge
from oproxy.state.redis import RedisStateStore

url, namespace, go, attempts, limit, now = sys.argv[1:]

async def main(reactor):
    store = RedisStateStore(RedisClient(reactor, url), namespace=namespace)
    await store.ping()
    while not Path(go).exists():
        time.sleep(0.001)
    charge = RateCharge("race", "requests", 1, int(limit))
    calls = [store.admit([charge], [], [], float(now)) for _ in range(int(attempts))]
    outcomes = await defer.gatherResults(calls)
    print(sum(outcome.admitted for outcome in outcomes))
    await store.close()

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""


def run_workers(code: str, args: list[str], go: Path, processes: int) -> list[str]:
    """Start ``processes`` Pythons running ``code``, release them together, collect stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    time.sleep(0.5)  # let them all reach the starting line
    go.touch()
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        outputs.append(out)
    return outputs


LIMIT = 60
PROCESSES = 4
ATTEMPTS = 3 * LIMIT // PROCESSES


def test_sqlite_is_exact_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "oproxy.db"  # the workers race to create it, too
    go = tmp_path / "go"
    args = [str(path), str(go), str(ATTEMPTS), str(LIMIT), repr(NOW)]
    outputs = run_workers(SQLITE_WORKER, args, go, PROCESSES)
    counts = [tuple(map(int, out.split())) for out in outputs]
    assert sum(rates for rates, _ in counts) == LIMIT
    assert sum(quotas for _, quotas in counts) == LIMIT
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT used FROM quota_counters").fetchall() == [(LIMIT,)]


def test_redis_is_exact_across_processes(redis_server: RedisServer, tmp_path: Path) -> None:
    go = tmp_path / "go"
    namespace = f"test:{uuid.uuid4().hex}:"
    args = [redis_server.url, namespace, str(go), str(ATTEMPTS), str(LIMIT), repr(NOW)]
    outputs = run_workers(REDIS_WORKER, args, go, PROCESSES)
    assert sum(int(out) for out in outputs) == LIMIT


@pytest_twisted.ensureDeferred
async def test_concurrent_admissions_are_exact(backend: Backend) -> None:
    """Several connections, every call in flight at once: no more than the limit passes."""
    stores = [backend.open() for _ in range(PROCESSES)]
    rate = per_minute(LIMIT, "race")
    quota = QuotaCharge("race", 1, LIMIT // 2, NOW + 3600)
    calls = [
        stores[attempt % PROCESSES].admit([rate], [quota], [], NOW) for attempt in range(3 * LIMIT)
    ]
    outcomes: list[Admission] = await defer.gatherResults(calls)
    assert sum(outcome.admitted for outcome in outcomes) == LIMIT // 2
    assert await stores[0].quota_used("race") == LIMIT // 2
    kinds = {outcome.refusal.kind for outcome in outcomes if outcome.refusal}
    assert kinds == {"quota"}  # the rate bucket was charged only for the admitted
    remaining = [outcome.rates[0].remaining for outcome in outcomes if outcome.admitted]
    assert sorted(remaining) == list(range(LIMIT // 2, LIMIT))


# -- Redis only ----------------------------------------------------------------------


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[Callable[[], RedisClient]]:
    made: list[RedisClient] = []

    def connect() -> RedisClient:
        client = RedisClient(reactor, redis_server.url)
        made.append(client)
        return client

    yield connect
    for client in made:
        pytest_twisted.blockon(client.close())


@pytest_twisted.ensureDeferred
async def test_redis_keys_live_under_the_namespace_and_expire(
    redis: Callable[[], RedisClient],
) -> None:
    namespace = f"test:{uuid.uuid4().hex}:"
    store = RedisStateStore(redis(), namespace=namespace)
    admin = redis()
    quota = QuotaCharge("day", 1, 10, NOW + 600)
    assert (await admit(store, [per_minute(6)], [quota], [lease("a", NOW + 30)])).admitted
    await store.add_key(key("k1", "alice"))
    found = sorted(await admin.execute("KEYS", namespace + "*"))
    assert found == [
        f"{namespace}{name}".encode()
        for name in ["key-names", "key:k1", "keys", "keys-active", "lease:p", "quota:day", "rate:r"]
    ]
    # A bucket is kept for its period after it is full again (10 s + 60 s here).
    assert 69_000 < await admin.execute("PTTL", namespace + "rate:r") <= 70_000
    # A counter for its period and a minute more; leases a second past the last one.
    assert 659_000 < await admin.execute("PTTL", namespace + "quota:day") <= 660_000
    assert 30_000 < await admin.execute("PTTL", namespace + "lease:p") <= 31_000
    assert float(await admin.execute("GET", namespace + "rate:r")) == NOW + 10


@pytest_twisted.ensureDeferred
async def test_redis_responses_expire_by_themselves(redis: Callable[[], RedisClient]) -> None:
    namespace = f"test:{uuid.uuid4().hex}:"
    store = RedisStateStore(redis(), namespace=namespace)
    admin = redis()
    await store.put_response(stored("resp_1", expires=NOW + 60), [], NOW)
    assert 59_000 < await admin.execute("PTTL", namespace + "response:resp_1") <= 60_000
    await store.put_response(stored("resp_2", expires=NOW + 600), ["resp_1"], NOW)
    assert 599_000 < await admin.execute("PTTL", namespace + "response:resp_1") <= 600_000


@pytest_twisted.ensureDeferred
async def test_redis_loads_its_scripts_again_after_a_flush(
    redis: Callable[[], RedisClient],
) -> None:
    store = RedisStateStore(redis(), namespace=f"test:{uuid.uuid4().hex}:")
    admin = redis()
    assert (await admit(store, [per_minute(2)])).admitted
    await admin.execute("SCRIPT", "FLUSH")
    assert await admin.execute("SCRIPT", "EXISTS", ADMIT.sha) == [0]
    assert (await admit(store, [per_minute(2)])).admitted
    assert not (await admit(store, [per_minute(2)])).admitted
    assert await admin.execute("SCRIPT", "EXISTS", ADMIT.sha) == [1]


@pytest_twisted.ensureDeferred
async def test_redis_errors_become_state_unavailable(redis: Callable[[], RedisClient]) -> None:
    namespace = f"test:{uuid.uuid4().hex}:"
    store = RedisStateStore(redis(), namespace=namespace)
    await redis().execute("SET", namespace + "lease:p", "not a sorted set")
    with pytest.raises(StateUnavailable, match="WRONGTYPE"):
        await admit(store, leases=[lease("a")])


@pytest_twisted.ensureDeferred
async def test_redis_recovers_when_the_server_returns(redis_server: RedisServer) -> None:
    client = RedisClient(reactor, redis_server.url, retry_delay=0)
    store = RedisStateStore(client, namespace=f"test:{uuid.uuid4().hex}:")
    await store.ping()
    redis_server.stop()
    try:
        with pytest.raises(StateUnavailable):
            await admit(store, [per_minute(1)])
    finally:
        redis_server.start()
    assert (await admit(store, [per_minute(1)])).admitted
    await store.close()


# -- the arithmetic, as properties ----------------------------------------------------

nows = st.one_of(st.floats(0, 1e4), st.floats(1.5e9, 2.2e9))
limits = st.integers(1, 5000)
periods = st.sampled_from([1.0, 7.0, 60.0, 3600.0, 86400.0])


@given(now=nows, limit=limits, period=periods, cost=st.integers(1, 50))
def test_a_burst_at_one_instant_takes_exactly_the_limit(
    now: float, limit: int, period: float, cost: int
) -> None:
    charge = RateCharge("b", "tokens", cost, limit, period)
    tat: float | None = None
    taken = 0
    for _ in range(limit // cost):
        step = rate_step(tat, now, charge)
        assert step.allowed and step.used == taken
        taken += cost
        assert step.remaining == limit - taken
        tat = step.tat
    refused = rate_step(tat, now, charge)
    assert not refused.allowed and refused.tat == (now if tat is None else tat)
    assert refused.remaining == limit - taken < cost


@given(now=nows, limit=limits, period=periods, cost=st.integers(1, 50), used=st.integers(0, 50))
def test_retry_after_is_exact(now: float, limit: int, period: float, cost: int, used: int) -> None:
    charge = RateCharge("b", "tokens", cost, limit, period)
    tat = rate_settle(None, now, replace(charge, cost=limit + used))  # full, and some debt
    refused = rate_step(tat, now, charge)
    if cost > limit:
        assert refused.retry_after is None
        return
    assert refused.retry_after is not None and refused.retry_after > 0
    interval = period / limit
    assert not rate_step(tat, now + refused.retry_after - interval / 2, charge).allowed
    assert rate_step(tat, now + refused.retry_after, charge).allowed


@given(now=nows, limit=limits, period=periods, cost=st.integers(-10_000, 10_000))
def test_settling_never_overfills(now: float, limit: int, period: float, cost: int) -> None:
    charge = RateCharge("b", "tokens", cost, limit, period)
    half = rate_step(None, now, replace(charge, cost=limit // 2 or 1)).tat
    settled = rate_settle(half, now, charge)
    assert settled >= now
    expected = (limit // 2 or 1) + cost
    assert settled - now == pytest.approx(max(0, expected) * period / limit, abs=1e-3)
    assert rate_step(settled, now, replace(charge, cost=0)).used == min(limit, max(0, expected))


@given(now=nows, limit=limits, period=periods)
def test_the_tolerance_is_never_a_whole_unit(now: float, limit: int, period: float) -> None:
    interval = period / limit
    assert 0 < fit_tolerance(now, interval) <= interval / 4
    assert not math.isnan(fit_tolerance(now, interval))
