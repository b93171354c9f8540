"""
What a state store offers, and the arithmetic every store shares.

Rate limits are GCRA buckets (a token bucket kept as one timestamp, the
"theoretical arrival time"): a limit of ``limit`` per ``period`` lets a
burst of ``limit`` through at once and then refills continuously, which is
how OpenAI's own limits behave and why a client told "retry in 1s" can.
Quotas are plain counters per calendar period.  Parallel limits are leases
that expire, so a process that dies cannot hold a slot for ever.

The functions here are pure; a store runs them (or, for Redis, the same
steps in Lua) inside one atomic step.

Circuit records are the routing breaker's state shared between processes.
The store does not read them: it keeps each as an opaque string with an
expiry and replaces it atomically with what the caller's function makes of
it, so both stores agree by construction on what the breaker decides.

Stored responses (OpenAI's Responses API with ``store: true``) are opaque
documents too, each with its owner (the caller who made it) and an expiry;
a caller reads and deletes only its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from twisted.internet import defer
from zope.interface import Interface

#: What a charge limits; the names appear in headers and error messages.
Family = Literal["requests", "tokens"]


class StateUnavailable(Exception):
    """The store could not be reached or did not answer in time."""


@dataclass(frozen=True)
class RateCharge:
    """
    Take ``cost`` from the bucket ``bucket`` that holds ``limit`` per ``period`` seconds.
    """

    bucket: str
    family: Family
    cost: int
    limit: int
    period: float = 60.0


@dataclass(frozen=True)
class QuotaCharge:
    """
    Reserve ``cost`` on the counter ``bucket`` for a period ending at ``period_end``.

    Admitted while the counter is below ``limit`` (a request is not refused
    for what it *might* use; the reservation keeps concurrent requests from
    all slipping under the line together).  The counter may be forgotten
    after ``period_end``: a new period has a new bucket name.
    """

    bucket: str
    cost: int
    limit: int
    period_end: float


@dataclass(frozen=True)
class Lease:
    """
    Hold one of ``limit`` parallel slots of ``bucket`` under the name ``lease_id``.

    The slot is released explicitly, or lapses at ``expires`` (renewed while
    the request runs) if the process holding it dies.
    """

    bucket: str
    lease_id: str
    limit: int
    expires: float


@dataclass(frozen=True)
class RateState:
    """A rate bucket after an admission, for the response headers."""

    bucket: str
    family: Family
    limit: int
    remaining: int
    #: Seconds until the bucket is full again.
    reset: float


@dataclass(frozen=True)
class Refusal:
    """
    Why an admission failed.

    :ivar kind: ``rate`` (requests or tokens per period), ``quota`` or ``parallel``.
    :ivar retry_after: seconds until the same request could pass, or
        ``None`` when waiting cannot help (a cost above the whole limit).
    """

    kind: Literal["rate", "quota", "parallel"]
    bucket: str
    limit: int
    used: int
    requested: int
    family: Family | None = None
    retry_after: float | None = None


@dataclass(frozen=True)
class Admission:
    """
    The outcome of :meth:`IStateStore.admit`: nothing was charged unless ``refusal`` is ``None``.
    """

    refusal: Refusal | None
    rates: tuple[RateState, ...] = ()

    @property
    def admitted(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class KeyRecord:
    """
    A key kept by the store.  Only the SHA-256 of its secret is held.

    :ivar key_id: the public id, the part of ``sk-oproxy-<id>-<secret>``
        the store looks the key up by.
    :ivar policy: the key's policy as a JSON object (see
        :mod:`oproxy.security.keys`); the store does not interpret it.
    """

    key_id: str
    name: str
    secret_sha256: bytes
    created: float
    policy: dict[str, object] = field(default_factory=dict)
    revoked: float | None = None


@dataclass(frozen=True)
class CircuitRecord:
    """
    What a store keeps for one circuit: an opaque value, until ``expires``.

    The store treats an expired record as absent and may forget it.
    """

    value: str
    expires: float


@dataclass(frozen=True)
class StoredResponse:
    """
    A response kept for its owner until ``expires``.

    :ivar owner: the caller that made it (its subject, ``key:<id>``...):
        nobody else may read, chain from or delete it.
    :ivar document: the response, its input and its history, as JSON; the
        store does not read it.
    """

    response_id: str
    owner: str
    expires: float
    document: str


#: What :meth:`IStateStore.update_circuit` calls with a circuit's current
#: value (``None``: none, or expired): the record to keep, or ``None`` to drop it.
CircuitChange = Callable[[str | None], CircuitRecord | None]


class IStateStore(Interface):
    """
    Keys, limits, quotas and circuit states shared by every process that serves.

    Every method returns a Deferred and fails with :class:`StateUnavailable`
    when the store cannot be reached.  ``now`` always comes from the
    caller's clock, so tests drive time and hosts must keep theirs in sync.
    """

    def admit(
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        leases: Sequence[Lease],
        now: float,
    ) -> defer.Deferred[Admission]:
        """
        Check every charge and lease; if all pass, apply all of them, atomically.

        A refused admission changes nothing.
        """

    def settle(
        rates: Sequence[RateCharge],
        quotas: Sequence[QuotaCharge],
        released: Sequence[Lease],
        now: float,
    ) -> defer.Deferred[None]:
        """
        Correct earlier charges by the ``cost`` given here, which may be
        negative (a refund: never below an empty bucket or a zero counter)
        or positive (a debt: later requests wait for it), and release leases.
        """

    def renew(leases: Sequence[Lease], now: float) -> defer.Deferred[None]:
        """Push back the expiry of leases still in use (to each lease's ``expires``)."""

    def quota_used(bucket: str) -> defer.Deferred[int]:
        """The counter of a quota bucket (0 when unknown)."""

    def add_key(record: KeyRecord) -> defer.Deferred[None]:
        """Store a new key; fails with ``ValueError`` if its id or name is taken."""

    def save_key(record: KeyRecord) -> defer.Deferred[None]:
        """
        Replace a stored key (same id): revocation, rotation, policy change.

        Fails with ``KeyError`` when no key has this id (saving never
        creates: that is :meth:`add_key`'s job) and with ``ValueError`` when
        the new name belongs to another key.
        """

    def get_key(key_id: str) -> defer.Deferred[KeyRecord | None]:
        """The key with this public id, revoked or not."""

    def list_keys() -> defer.Deferred[list[KeyRecord]]:
        """Every stored key, oldest first."""

    def has_active_keys() -> defer.Deferred[bool]:
        """Whether any key that is not revoked exists."""

    def update_circuit(name: str, change: CircuitChange, now: float) -> defer.Deferred[str | None]:
        """
        Replace the circuit record ``name`` with ``change(current value)``, atomically.

        ``change`` may run more than once (a store that lost a race runs it
        again on what won), so it must not have effects of its own beyond
        its answer.  The result is the value kept (``None``: no record).
        """

    def circuits(now: float) -> defer.Deferred[dict[str, str]]:
        """Every circuit record that has not expired at ``now``: its value, by name."""

    def put_response(
        record: StoredResponse, extend: Sequence[str], now: float
    ) -> defer.Deferred[None]:
        """
        Keep ``record`` (replacing one with its id), and make the owner's
        responses named in ``extend`` last at least as long: a response is
        chained onto those, and must not outlive them.  Responses expired
        at ``now`` may be forgotten on the way.
        """

    def get_responses(
        response_ids: Sequence[str], owner: str, now: float
    ) -> defer.Deferred[dict[str, StoredResponse]]:
        """
        The responses among ``response_ids`` that ``owner`` made and that
        have not expired at ``now``, by id; the others are simply missing.
        """

    def delete_response(response_id: str, owner: str, now: float) -> defer.Deferred[bool]:
        """Forget ``owner``'s response ``response_id``; whether there was one."""

    def ping() -> defer.Deferred[None]:
        """Succeed when the store answers."""

    def close() -> defer.Deferred[None]:
        """Let go of files and connections."""


# -- the arithmetic every store runs ------------------------------------------


def emission_interval(limit: int, period: float) -> float:
    """Seconds one unit of a bucket takes to refill."""
    return period / limit


@dataclass(frozen=True)
class RateStep:
    """One GCRA step: whether the charge fits, and the bucket after it."""

    allowed: bool
    #: The new theoretical arrival time (unchanged when refused).
    tat: float
    remaining: int
    reset: float
    #: When refused: seconds until it would fit, or ``None`` if it never can.
    retry_after: float | None
    #: Units of the bucket in use before the charge.
    used: int


def fit_tolerance(now: float, interval: float) -> float:
    """
    How far a bucket's level may be off a whole number of units and count as it, in seconds.

    Float error, not policy: ``now`` is wall-clock time (about 1.7e9, where
    one float step is about 2.4e-7 s), so every ``tat`` written is rounded,
    and a burst of ``limit`` exactly fitting charges must not lose its last
    unit to that, nor gain one.  The tolerance grows with the size of
    ``now`` and stays below a quarter of an interval, so it never stands for
    a whole unit.  The Lua scripts of the Redis store use the same literals
    and operations, so they decide bit for bit as this does.
    """
    return min(interval / 4, 1e-6 + abs(now) * 1e-13)


def seconds_in_use(tat: float | None, now: float, interval: float, slack: float) -> float:
    """
    How far ahead of ``now`` the bucket ``tat`` is, snapped to whole units within ``slack``.

    The snap is what keeps rounding from piling up: each step starts again
    from an exact number of units instead of adding its error to the last.
    """
    ahead = max(tat if tat is not None else now, now) - now
    units = ahead / interval
    whole = math.floor(units + 0.5)
    if abs(units - whole) * interval <= slack:
        return whole * interval
    return ahead


def rate_step(tat: float | None, now: float, charge: RateCharge) -> RateStep:
    """
    Try to take ``charge.cost`` from a bucket whose state is ``tat``.

    ``tat`` is ``None`` for a bucket never used (full).  The bucket is full
    when ``tat <= now``; each unit taken pushes ``tat`` one emission
    interval later; a charge fits while ``tat - now`` stays within the
    period.
    """
    interval = emission_interval(charge.limit, charge.period)
    slack = fit_tolerance(now, interval)
    ahead = seconds_in_use(tat, now, interval, slack)
    used = min(charge.limit, max(0, math.ceil((ahead - slack) / interval)))
    after = ahead + charge.cost * interval
    if after <= charge.period + slack:
        remaining = max(0, math.floor((charge.period - after + slack) / interval))
        return RateStep(True, now + after, remaining, after, None, used)
    never = charge.cost > charge.limit
    wait = None if never else after - charge.period
    remaining = max(0, math.floor((charge.period - ahead + slack) / interval))
    unchanged = max(tat if tat is not None else now, now)
    return RateStep(False, unchanged, remaining, ahead, wait, used)


def rate_settle(tat: float | None, now: float, charge: RateCharge) -> float:
    """
    The bucket after correcting a charge by ``charge.cost`` (negative refunds).

    A refund never leaves the bucket fuller than full; a debt may push it
    past the period, and later charges wait until it is paid.
    """
    interval = emission_interval(charge.limit, charge.period)
    ahead = seconds_in_use(tat, now, interval, fit_tolerance(now, interval))
    return now + max(0.0, ahead + charge.cost * interval)


def quota_fits(used: int, charge: QuotaCharge) -> bool:
    """A quota admits while anything is left (see :class:`QuotaCharge`)."""
    return used < charge.limit
