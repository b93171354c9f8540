"""
Admission outcomes rebuilt from GCRA steps: pure, shared by both stores.

The SQLite store computes the steps in Python; the Redis store's Lua
returns the stored buckets and Python rebuilds the same answer with these
functions, so both stores answer alike by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from oproxy.state.base import RateCharge, RateState, RateStep, Refusal, rate_step


def rate_steps(
    rates: Sequence[RateCharge], stored: Sequence[float | None], now: float
) -> list[RateStep]:
    """
    Each charge's GCRA step, in order, over the ``stored`` buckets.

    A bucket named twice sees the first charge before the second, as it
    would had they come one after the other.
    """
    taken: dict[str, float] = {}
    steps = []
    for charge, tat in zip(rates, stored, strict=True):
        step = rate_step(taken.get(charge.bucket, tat), now, charge)
        if step.allowed:
            taken[charge.bucket] = step.tat
        steps.append(step)
    return steps


def rate_refusal(rates: Sequence[RateCharge], steps: Sequence[RateStep]) -> Refusal | None:
    """The first rate charge that does not fit, as a refusal."""
    for charge, step in zip(rates, steps, strict=True):
        if not step.allowed:
            return Refusal(
                "rate",
                charge.bucket,
                charge.limit,
                step.used,
                charge.cost,
                family=charge.family,
                retry_after=step.retry_after,
            )
    return None


def rate_states(rates: Sequence[RateCharge], steps: Sequence[RateStep]) -> tuple[RateState, ...]:
    """The buckets after an admission, for the response headers."""
    return tuple(
        RateState(charge.bucket, charge.family, charge.limit, step.remaining, step.reset)
        for charge, step in zip(rates, steps, strict=True)
    )


def rate_states_unchanged(
    rates: Sequence[RateCharge], stored: Sequence[float | None], now: float
) -> tuple[RateState, ...]:
    """The buckets as they stand after a refusal, which charged nothing."""
    looks = [rate_step(tat, now, replace(c, cost=0)) for c, tat in zip(rates, stored, strict=True)]
    return rate_states(rates, looks)
