"""
The embedded state store: one SQLite file shared by every worker process of a host.

Why SQLite and why this shape: the workers of one host need one view of
every limit without another daemon to run.  In WAL mode readers never wait
for the writer, and ``BEGIN IMMEDIATE`` takes the write lock *before* the
first read, so the check-then-apply of an admission cannot interleave with
another process's: a limit holds exactly however many workers share it.

The statements are tiny and run in the reactor thread, which the design
allows for bounded SQLite work.  The bound is ``busy_timeout``: a lock held
longer than that by another process fails the call with
:class:`~oproxy.state.base.StateUnavailable` instead of stalling the reactor.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.internet import defer
from zope.interface import implementer

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
    quota_fits,
    rate_settle,
)
from oproxy.state.outcomes import rate_refusal, rate_states, rate_states_unchanged, rate_steps

T = TypeVar("T")

#: Bumped when the tables change; a file from a newer oproxy is refused.
#: 2 added ``circuits``, 3 ``responses``.
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret_sha256 BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    policy TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_buckets (
    bucket TEXT PRIMARY KEY,
    tat REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_buckets_by_tat ON rate_buckets (tat);
CREATE TABLE IF NOT EXISTS quota_counters (
    bucket TEXT PRIMARY KEY,
    used INTEGER NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quota_counters_by_expiry ON quota_counters (expires);
CREATE TABLE IF NOT EXISTS leases (
    bucket TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (bucket, lease_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires);
CREATE TABLE IF NOT EXISTS circuits (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL,
    document TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires);
"""

#: Seconds of caller time between sweeps of expired rows, per process.
PURGE_EVERY = 60.0

#: Ids looked up by one statement (SQLite's bound on parameters is higher).
IDS_PER_STATEMENT = 500

# SQLITE_BUSY and SQLITE_LOCKED: contention, after which the connection is still good.
_CONTENTION = {5, 6}


@implementer(IStateStore)
class SQLiteStore:
    """
    Keys and limits in one SQLite file, safe to share between processes.

    The constructor does no I/O: the file (and its directory, mode 0700) is
    created and opened by the first call, and opened again by the next call
    after a failure, so a store on a disk that comes back recovers by itself.
    Call :meth:`ping` at start-up to fail early on a path that cannot work.

    :param path: the database file; created with mode 0600 if missing.
    :param busy_timeout: seconds a call waits for another process's write
        lock before failing with ``StateUnavailable``.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 2.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._next_purge = -math.inf
        self._next_response_purge = -math.inf

    # -- limits ------------------------------------------------------------------

    def admit(
        self,
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        leases: Sequence[Lease],
        now: float,
    ) -> defer.Deferred[Admission]:
        return self._call(lambda db: self._admit(db, rates, quotas, leases, now))

    def settle(
        self,
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        released: Sequence[Lease],
        now: float,
    ) -> defer.Deferred[None]:
        return self._call(lambda db: self._settle(db, rates, quotas, released, now))

    def renew(self, leases: Sequence[Lease], now: float) -> defer.Deferred[None]:
        def renew(db: sqlite3.Connection) -> None:
            with _immediate(db):
                # A lapsed lease stays lapsed: its slot may be someone else's by now.
                db.executemany(
                    "UPDATE leases SET expires = ?"
                    " WHERE bucket = ? AND lease_id = ? AND expires > ?",
                    [(lease.expires, lease.bucket, lease.lease_id, now) for lease in leases],
                )

        return self._call(renew)

    def quota_used(self, bucket: str) -> defer.Deferred[int]:
        return self._call(lambda db: _used(db, bucket))

    def _admit(
        self,
        db: sqlite3.Connection,
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        leases: Sequence[Lease],
        now: float,
    ) -> Admission:
        with _immediate(db):
            stored = [_tat(db, charge.bucket) for charge in rates]
            steps = rate_steps(rates, stored, now)
            refusal = (
                rate_refusal(rates, steps)
                or _quota_refusal(db, quotas)
                or _lease_refusal(db, leases, now)
            )
            if refusal is not None:
                return Admission(refusal, rate_states_unchanged(rates, stored, now))
            db.executemany(
                "INSERT INTO rate_buckets (bucket, tat) VALUES (?, ?)"
                " ON CONFLICT (bucket) DO UPDATE SET tat = excluded.tat",
                [(charge.bucket, step.tat) for charge, step in zip(rates, steps, strict=True)],
            )
            db.executemany(
                "INSERT INTO quota_counters (bucket, used, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (bucket) DO UPDATE SET used = used + excluded.used,"
                " expires = max(expires, excluded.expires)",
                [(quota.bucket, quota.cost, quota.period_end) for quota in quotas],
            )
            db.executemany(
                "INSERT OR REPLACE INTO leases (bucket, lease_id, expires) VALUES (?, ?, ?)",
                [(lease.bucket, lease.lease_id, lease.expires) for lease in leases],
            )
            self._maybe_purge(db, now)
        return Admission(None, rate_states(rates, steps))

    def _settle(
        self,
        db: sqlite3.Connection,
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        released: Sequence[Lease],
        now: float,
    ) -> None:
        with _immediate(db):
            for charge in rates:
                tat = rate_settle(_tat(db, charge.bucket), now, charge)
                db.execute(
                    "INSERT INTO rate_buckets (bucket, tat) VALUES (?, ?)"
                    " ON CONFLICT (bucket) DO UPDATE SET tat = excluded.tat",
                    (charge.bucket, tat),
                )
            for quota in quotas:
                used = max(0, _used(db, quota.bucket) + quota.cost)
                db.execute(
                    "INSERT INTO quota_counters (bucket, used, expires) VALUES (?, ?, ?)"
                    " ON CONFLICT (bucket) DO UPDATE SET used = excluded.used,"
                    " expires = max(expires, excluded.expires)",
                    (quota.bucket, used, quota.period_end),
                )
            db.executemany(
                "DELETE FROM leases WHERE bucket = ? AND lease_id = ?",
                [(lease.bucket, lease.lease_id) for lease in released],
            )

    def _maybe_purge(self, db: sqlite3.Connection, now: float) -> None:
        """Forget what no longer matters: full buckets, past periods, lapsed leases."""
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        db.execute("DELETE FROM rate_buckets WHERE tat < ?", (now,))
        db.execute("DELETE FROM quota_counters WHERE expires < ?", (now,))
        db.execute("DELETE FROM leases WHERE expires <= ?", (now,))

    # -- circuits ------------------------------------------------------------------

    def update_circuit(
        self, name: str, change: CircuitChange, now: float
    ) -> defer.Deferred[str | None]:
        def update(db: sqlite3.Connection) -> str | None:
            with _immediate(db):
                found = db.execute(
                    "SELECT value FROM circuits WHERE name = ? AND expires > ?", (name, now)
                ).fetchone()
                record = change(found[0] if found else None)
                # The table holds a row per circuit that failed lately: a
                # sweep of it is as cheap as the write it comes with.
                db.execute("DELETE FROM circuits WHERE expires <= ? OR name = ?", (now, name))
                if record is None:
                    return None
                db.execute(
                    "INSERT INTO circuits (name, value, expires) VALUES (?, ?, ?)",
                    (name, record.value, record.expires),
                )
                return record.value

        return self._call(update)

    def circuits(self, now: float) -> defer.Deferred[dict[str, str]]:
        def read(db: sqlite3.Connection) -> dict[str, str]:
            rows = db.execute("SELECT name, value FROM circuits WHERE expires > ?", (now,))
            return dict(rows.fetchall())

        return self._call(read)

    # -- stored responses ----------------------------------------------------------

    def put_response(
        self, record: StoredResponse, extend: Sequence[str], now: float
    ) -> defer.Deferred[None]:
        def put(db: sqlite3.Connection) -> None:
            with _immediate(db):
                db.execute(
                    "INSERT OR REPLACE INTO responses (response_id, owner, expires, document)"
                    " VALUES (?, ?, ?, ?)",
                    (record.response_id, record.owner, record.expires, record.document),
                )
                for ids in _batches(extend):
                    db.execute(  # placeholders only: the ids are parameters
                        "UPDATE responses SET expires = max(expires, ?)"  # noqa: S608
                        f" WHERE owner = ? AND response_id IN ({_marks(ids)})",
                        (record.expires, record.owner, *ids),
                    )
                self._maybe_purge_responses(db, now)

        return self._call(put)

    def get_responses(
        self, response_ids: Sequence[str], owner: str, now: float
    ) -> defer.Deferred[dict[str, StoredResponse]]:
        def get(db: sqlite3.Connection) -> dict[str, StoredResponse]:
            found: dict[str, StoredResponse] = {}
            for ids in _batches(response_ids):
                rows = db.execute(  # placeholders only: the ids are parameters
                    "SELECT response_id, owner, expires, document FROM responses"  # noqa: S608
                    f" WHERE owner = ? AND expires > ? AND response_id IN ({_marks(ids)})",
                    (owner, now, *ids),
                )
                for response_id, stored_owner, expires, document in rows:
                    found[response_id] = StoredResponse(
                        response_id, stored_owner, float(expires), document
                    )
            return found

        return self._call(get)

    def delete_response(self, response_id: str, owner: str, now: float) -> defer.Deferred[bool]:
        def delete(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM responses WHERE response_id = ? AND owner = ? AND expires > ?",
                (response_id, owner, now),
            )
            return cursor.rowcount > 0

        return self._call(delete)

    def _maybe_purge_responses(self, db: sqlite3.Connection, now: float) -> None:
        """Forget expired responses, now and then (readers skip them meanwhile)."""
        if now < self._next_response_purge:
            return
        self._next_response_purge = now + PURGE_EVERY
        db.execute("DELETE FROM responses WHERE expires <= ?", (now,))

    # -- keys ----------------------------------------------------------------------

    def add_key(self, record: KeyRecord) -> defer.Deferred[None]:
        def add(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    "INSERT INTO keys (key_id, name, secret_sha256, created, revoked, policy)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    _key_row(record),
                )
            except sqlite3.IntegrityError as e:
                raise _taken(record, e) from None

        return self._call(add)

    def save_key(self, record: KeyRecord) -> defer.Deferred[None]:
        def save(db: sqlite3.Connection) -> None:
            key_id, *fields = _key_row(record)
            try:
                cursor = db.execute(
                    "UPDATE keys SET name = ?, secret_sha256 = ?, created = ?, revoked = ?,"
                    " policy = ? WHERE key_id = ?",
                    (*fields, key_id),
                )
            except sqlite3.IntegrityError as e:
                raise _taken(record, e) from None
            if cursor.rowcount == 0:
                raise KeyError(f"no key with id {record.key_id!r}")

        return self._call(save)

    def get_key(self, key_id: str) -> defer.Deferred[KeyRecord | None]:
        def get(db: sqlite3.Connection) -> KeyRecord | None:
            row = db.execute(_SELECT_KEYS + " WHERE key_id = ?", (key_id,))
            found = row.fetchone()
            return _key_record(found) if found else None

        return self._call(get)

    def list_keys(self) -> defer.Deferred[list[KeyRecord]]:
        def list_all(db: sqlite3.Connection) -> list[KeyRecord]:
            rows = db.execute(_SELECT_KEYS + " ORDER BY created, key_id")
            return [_key_record(row) for row in rows]

        return self._call(list_all)

    def has_active_keys(self) -> defer.Deferred[bool]:
        def any_active(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT EXISTS (SELECT 1 FROM keys WHERE revoked IS NULL)")
            return bool(row.fetchone()[0])

        return self._call(any_active)

    # -- the file --------------------------------------------------------------

    def ping(self) -> defer.Deferred[None]:
        return self._call(lambda db: None)

    def close(self) -> defer.Deferred[None]:
        self._closed = True
        db, self._db = self._db, None
        if db is not None:
            db.close()
        return defer.succeed(None)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> defer.Deferred[T]:
        """Run ``work`` now; its result or its failure, as a fired Deferred."""
        try:
            return defer.succeed(self._guarded(work))
        except Exception:
            return defer.fail()

    def _guarded(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return work(self._connection())
        except (sqlite3.OperationalError, OSError) as e:
            self._forget_connection(e)
            raise StateUnavailable(f"the SQLite state store {self.path} is unavailable: {e}") from e
        except sqlite3.DatabaseError as e:
            if type(e) is not sqlite3.DatabaseError:  # integrity, programming: ours to see
                raise
            # The bare class is what a file that is not a database (or is corrupt) raises.
            self._forget_connection(e)
            raise StateUnavailable(f"the SQLite state store {self.path} is unusable: {e}") from e

    def _forget_connection(self, error: Exception) -> None:
        """After anything but contention, start again with a fresh connection next time."""
        if getattr(error, "sqlite_errorcode", None) in _CONTENTION or self._db is None:
            return
        db, self._db = self._db, None
        with suppress(sqlite3.Error):
            db.close()

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise StateUnavailable(f"the SQLite state store {self.path} was closed")
        if self._db is None:
            self._db = _open(self.path, self.busy_timeout)
        return self._db


# -- the file ----------------------------------------------------------------------


def _open(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open (creating if need be) the database, in WAL mode, with the tables in place."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Create the file ourselves so it is private from the first byte; SQLite
    # gives its -wal and -shm files the same mode.
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        _use_wal(db, busy_timeout)
        db.execute("PRAGMA synchronous = NORMAL")
        with _immediate(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateUnavailable(
                    f"the SQLite state store {path} was made by a newer oproxy"
                    f" (schema {version}, this one knows {SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def _use_wal(db: sqlite3.Connection, busy_timeout: float) -> None:
    """
    Put the file in WAL mode (once; the mode sticks to the file).

    Switching needs the file to itself, and SQLite reports a concurrent
    switch as "locked" at once rather than through the busy handler, which
    is what workers starting together on a fresh file run into.  So retry,
    for as long as ``busy_timeout`` would have waited.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode not in _CONTENTION or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """
    One write transaction that holds the lock from its first read.

    A plain ``BEGIN`` would read under a shared lock and could fail to
    upgrade when another process wrote in between; ``IMMEDIATE`` waits
    (``busy_timeout``) up front instead.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.rollback()
        raise


def _quota_refusal(db: sqlite3.Connection, quotas: Sequence[QuotaCharge]) -> Refusal | None:
    """The first quota that is used up, counting the charges before it."""
    counters: dict[str, int] = {}
    for quota in quotas:
        used = counters.get(quota.bucket)
        if used is None:
            used = _used(db, quota.bucket)
        if not quota_fits(used, quota):
            return Refusal("quota", quota.bucket, quota.limit, used, quota.cost)
        counters[quota.bucket] = used + quota.cost
    return None


def _lease_refusal(db: sqlite3.Connection, leases: Sequence[Lease], now: float) -> Refusal | None:
    """The first lease with no free slot, counting the leases before it."""
    holders: dict[str, set[str]] = {}
    for lease in leases:
        if lease.bucket not in holders:
            rows = db.execute(
                "SELECT lease_id FROM leases WHERE bucket = ? AND expires > ?",
                (lease.bucket, now),
            )
            holders[lease.bucket] = {row[0] for row in rows}
        held = holders[lease.bucket]
        if lease.lease_id in held:
            continue  # already holding this slot
        if len(held) >= lease.limit:
            return Refusal("parallel", lease.bucket, lease.limit, len(held), 1)
        held.add(lease.lease_id)
    return None


def _batches(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        yield ids[start : start + IDS_PER_STATEMENT]


def _marks(ids: Sequence[str]) -> str:
    return ", ".join("?" * len(ids))


def _tat(db: sqlite3.Connection, bucket: str) -> float | None:
    found = db.execute("SELECT tat FROM rate_buckets WHERE bucket = ?", (bucket,)).fetchone()
    return float(found[0]) if found else None


def _used(db: sqlite3.Connection, bucket: str) -> int:
    found = db.execute("SELECT used FROM quota_counters WHERE bucket = ?", (bucket,)).fetchone()
    return int(found[0]) if found else 0


# -- key rows ----------------------------------------------------------------------

_SELECT_KEYS = "SELECT key_id, name, secret_sha256, created, revoked, policy FROM keys"


def _key_row(record: KeyRecord) -> tuple[str, str, bytes, float, float | None, str]:
    policy = json.dumps(record.policy, separators=(",", ":"), sort_keys=True)
    return (
        record.key_id,
        record.name,
        bytes(record.secret_sha256),
        record.created,
        record.revoked,
        policy,
    )


def _key_record(row: tuple[Any, ...]) -> KeyRecord:
    key_id, name, secret, created, revoked, policy = row
    return KeyRecord(
        key_id=key_id,
        name=name,
        secret_sha256=bytes(secret),
        created=float(created),
        policy=cast(dict[str, object], json.loads(policy)),
        revoked=None if revoked is None else float(revoked),
    )


def _taken(record: KeyRecord, error: sqlite3.IntegrityError) -> ValueError:
    if "keys.name" in str(error):
        return ValueError(f"a key named {record.name!r} exists")
    return ValueError(f"a key with id {record.key_id!r} exists")
