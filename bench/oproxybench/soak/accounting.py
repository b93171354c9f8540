"""
Accounting for a soak, without I/O: why each failed request failed, what
each key should have been charged, and whether the processes stayed flat.

Every request asks the same question of a deterministic model, so every
answer has the same usage ``U`` (its prompt and completion tokens) and
every request reserves the same estimate ``E`` when it is admitted (about a
token per four characters of the messages, plus 256 for an answer without
``max_tokens``: see docs/keys-and-limits.rst).  A request that completes is
charged ``U``; one whose worker is killed keeps its reservation ``E`` (no
process is left to settle it); a stream cut by its backend is charged the
prompt estimate plus the tokens relayed before the cut.  So the charge of
each key (one per reload period) is known to the token.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .load import Outcome

#: What a request without ``max_tokens`` reserves for its answer.
DEFAULT_COMPLETION_ESTIMATE = 256
#: How much a long-lived process's resident memory may grow.
RSS_TOLERANCE = 0.10
#: How many more descriptors a process may have open at the end, quiet,
#: besides its connections to the backends (the pool keeps up to 64 idle per
#: backend, as many as the load needed at once).
FD_SLACK = 2

KILLED = "in flight at a worker kill"
STOPPED = "in flight at the backend stop"
SIGTERM = "under way at SIGTERM"
UNEXPLAINED = "unexplained"


def prompt_estimate(messages: Sequence[Mapping[str, Any]]) -> int:
    """The daemon's guess at a prompt: a token per four characters of every string."""
    characters = sum(
        len(value) for message in messages for value in message.values() if isinstance(value, str)
    )
    return math.ceil(characters / 4)


def cause_of(
    outcome: Outcome,
    kills: Sequence[tuple[float, float]],
    stops: Sequence[tuple[float, float]],
    slack: float = 0.05,
) -> str:
    """
    Why a failed request failed: a fault while it was in flight, or nothing
    known.  Each fault is the interval from the moment it was set off to
    the moment it was over (a ``kill -9`` is an instant; a backend takes a
    moment to stop).
    """

    def during(faults: Sequence[tuple[float, float]]) -> bool:
        return any(
            outcome.started - slack <= end and start <= outcome.ended + slack
            for start, end in faults
        )

    if during(kills):
        return KILLED
    if during(stops):
        return STOPPED
    return UNEXPLAINED


@dataclass(frozen=True)
class Expected:
    """
    What every request costs: ``usage`` when it completes, ``reserved``
    while it runs; ``prompt_reserved`` is the prompt's part of that, and
    ``completion`` the tokens of a whole answer.
    """

    usage: int
    reserved: int
    prompt_reserved: int
    completion: int


def expected_answer(outcomes: Sequence[Outcome]) -> dict[str, Any] | None:
    """The most common successful answer (content and usage): what they all should be."""
    seen = Counter(
        (o.content, o.prompt_tokens, o.completion_tokens) for o in outcomes if o.ok and o.usage
    )
    if not seen:
        return None
    (content, prompt, completion), _ = seen.most_common(1)[0]
    return {"content": content, "prompt_tokens": prompt, "completion_tokens": completion}


@dataclass
class KeyAccount:
    """
    One key: its requests, what it was charged and what that should be.

    :ivar expected: the usage of its completed requests.
    :ivar delta: charged minus expected: what the faults cost, if anything.
    :ivar verdict: ``exact``, ``explained`` (the delta is what its failed
        requests account for, see :attr:`note`) or ``WRONG``.
    """

    key: str
    window: str
    ok: int
    failed: dict[str, int]
    charged: int | None
    expected: int
    delta: int | None = None
    verdict: str = ""
    note: str = ""
    kill_reservations: int = 0
    cut_charges: int = 0

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def account_key(
    key: str, window: str, outcomes: Sequence[Outcome], charged: int | None, cost: Expected
) -> KeyAccount:
    """
    Judge one key's charge: exact for a key whose requests all completed;
    otherwise the difference must be some of its killed requests'
    reservations (``E`` each, for those admitted before the kill) plus its
    cut streams' partial charges (the prompt estimate and up to a whole
    answer each).
    """
    ok = [o for o in outcomes if o.ok]
    causes = Counter(o.cause for o in outcomes if not o.ok)
    account = KeyAccount(key, window, len(ok), dict(causes), charged, len(ok) * cost.usage)
    if charged is None:
        account.verdict, account.note = "WRONG", "no charge could be read"
        return account
    account.delta = delta = charged - account.expected
    killed, cut = causes.get(KILLED, 0), causes.get(STOPPED, 0)
    others = sum(causes.values()) - killed - cut
    if delta == 0 and not causes:
        account.verdict = "exact"
        return account
    low, high = cut * cost.prompt_reserved, cut * (cost.prompt_reserved + cost.completion)
    for reservations in range(killed + 1):
        rest = delta - reservations * cost.reserved
        if not others and low <= rest <= high:
            account.verdict = "exact" if delta == 0 else "explained"
            account.kill_reservations, account.cut_charges = reservations, rest
            parts = []
            if killed:
                parts.append(
                    f"{reservations} of {killed} killed requests kept their reservation "
                    f"of {cost.reserved}"
                )
            if cut:
                parts.append(f"{cut} cut stream(s) charged {rest} in all")
            account.note = "; ".join(parts)
            return account
    account.verdict = "WRONG"
    lost = cost.reserved - cost.usage
    if not causes and lost > 0 and delta % lost == 0 and 0 < delta // lost <= len(ok):
        account.note = (
            f"{delta // lost} of {len(ok)} completed requests were charged their "
            f"reservation ({cost.reserved}) instead of their usage ({cost.usage}): "
            "their settlement was lost"
        )
        return account
    account.note = (
        f"{delta:+d} tokens not accounted for by {killed} killed request(s) "
        f"(reservation {cost.reserved} each), {cut} cut stream(s) "
        f"({cost.prompt_reserved}..{cost.prompt_reserved + cost.completion} each)"
        + (f" and {others} other failure(s)" if others else "")
    )
    return account


@dataclass
class Flatness:
    """One process role's memory or descriptors, quiet at the start and at the end."""

    role: str
    what: str
    start: int | None
    end: int | None
    verdict: str = ""
    change: str = ""

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def flatness(
    start: Mapping[str, Mapping[str, Any]],
    end: Mapping[str, Mapping[str, Any]],
    judged: Sequence[str],
) -> list[Flatness]:
    """
    RSS within :data:`RSS_TOLERANCE` and descriptors within :data:`FD_SLACK`
    for the roles in ``judged`` (those that lived the whole run); the other
    roles are shown, not judged.
    """
    rows = []
    for role in sorted(set(start) | set(end)):
        before, after = start.get(role, {}), end.get(role, {})
        rss = Flatness(role, "RSS KiB", before.get("rss_kib"), after.get("rss_kib"))
        fds = Flatness(
            role,
            "descriptors (not to backends)",
            before.get("fds_besides_pool"),
            after.get("fds_besides_pool"),
        )
        if rss.start and rss.end is not None:
            growth = (rss.end - rss.start) / rss.start
            rss.change = f"{growth * 100:+.1f}%"
            rss.verdict = "PASS" if growth <= RSS_TOLERANCE else "FAIL"
        if fds.start is not None and fds.end is not None:
            fds.change = f"{fds.end - fds.start:+d}"
            fds.verdict = "PASS" if fds.end - fds.start <= FD_SLACK else "FAIL"
        for row in (rss, fds):
            if role not in judged:
                row.verdict = "(not judged)"
            elif not row.verdict:
                row.verdict = "FAIL"
        if before.get("pid") != after.get("pid") and before and after:
            rss.change += " (another process)"
        rows += [rss, fds]
    return rows


@dataclass
class Criterion:
    """One line of the verdict."""

    name: str
    verdict: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class FakeTotals:
    """What the fake Ollamas generated over all their lives."""

    lives: int = 0
    completed: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, counters: Mapping[str, Any]) -> None:
        self.lives += 1
        self.completed += counters.get("completed", 0)
        self.aborted += counters.get("aborted", 0)
        self.prompt_tokens += counters.get("prompt_tokens", 0)
        self.completion_tokens += counters.get("completion_tokens", 0)
        for model, count in counters.get("tokens_by_model", {}).items():
            total = self.by_model.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0})
            for part in total:
                total[part] += count.get(part, 0)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens": self.tokens}
