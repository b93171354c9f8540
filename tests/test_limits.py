"""
The limit arithmetic and what clients are told: pure functions.
"""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oproxy.errors import QuotaExceeded, RateLimited, TokenRateLimited
from oproxy.security.limits import (
    DEFAULT_COMPLETION_ESTIMATE,
    IMAGE_TOKEN_ESTIMATE,
    Caller,
    corrections,
    estimate_completion_tokens,
    estimate_prompt_tokens,
    generation_count,
    go_duration,
    periods,
    plan,
    rate_headers,
    refusal_error,
)
from oproxy.security.policy import KeyPolicy, Limits
from oproxy.state.base import RateCharge, RateState, Refusal, rate_settle, rate_step

ALICE = Caller(
    subject="cfg:alice",
    name="alice",
    policy=KeyPolicy(
        limits=Limits(rpm=60, tpm=1000, max_parallel=2, daily_tokens=10_000, monthly_tokens=99_999),
        model_limits=(("qwen*", Limits(rpm=5, tpm=100)),),
    ),
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.009, "9ms"),
        (0.0201, "21ms"),
        (1, "1s"),
        (17.28, "17.28s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_durations_read_like_openais(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_plan_charges_every_limit_that_applies() -> None:
    spent = plan(
        ALICE,
        "qwen3:8b",
        prompt_estimate=30,
        completion_estimate=70,
        now=1_800_000_000.0,
        lease_id="req_1",
    )
    assert spent.estimate == 100
    assert [(r.bucket, r.family, r.cost, r.limit) for r in spent.rates] == [
        ("cfg:alice:rpm", "requests", 1, 60),
        ("cfg:alice:tpm", "tokens", 100, 1000),
        ("cfg:alice:model:qwen3:8b:rpm", "requests", 1, 5),
        ("cfg:alice:model:qwen3:8b:tpm", "tokens", 100, 100),
    ]
    assert [(q.bucket, q.cost, q.limit) for q in spent.quotas] == [
        ("cfg:alice:day:2027-01-15", 100, 10_000),
        ("cfg:alice:month:2027-01", 100, 99_999),
    ]
    (lease,) = spent.leases
    assert (lease.bucket, lease.lease_id, lease.limit) == ("cfg:alice:parallel", "req_1", 2)
    # Another model only meets the key's own limits.
    other = plan(ALICE, "llama3.2", prompt_estimate=1, completion_estimate=1, now=0, lease_id="x")
    assert [r.bucket for r in other.rates] == ["cfg:alice:rpm", "cfg:alice:tpm"]


def test_no_limits_no_charges() -> None:
    caller = Caller("ip:127.0.0.1", None, KeyPolicy())
    assert plan(caller, "m", prompt_estimate=5, completion_estimate=5, now=0, lease_id="r").empty


def test_corrections_move_tokens_never_requests() -> None:
    spent = plan(ALICE, "qwen3", prompt_estimate=30, completion_estimate=70, now=0, lease_id="r")
    rates, quotas = corrections(spent, 40)
    assert [(r.bucket, r.cost) for r in rates] == [
        ("cfg:alice:tpm", -60),
        ("cfg:alice:model:qwen3:tpm", -60),
    ]
    assert [q.cost for q in quotas] == [-60, -60]
    assert corrections(spent, 100) == ((), ())


def test_periods_are_utc_days_and_calendar_months() -> None:
    moment = calendar.timegm((2026, 12, 31, 23, 59, 59, 0, 0, 0)) + 0.5
    day, day_end, month, month_end = periods(moment)
    assert (day, month) == ("2026-12-31", "2026-12")
    assert day_end == calendar.timegm((2027, 1, 1, 0, 0, 0, 0, 0, 0))
    assert month_end == day_end
    assert periods(day_end)[0] == "2027-01-01"


def test_prompt_estimates() -> None:
    chat = {
        "messages": [
            {"role": "user", "content": "x" * 400},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y" * 40},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + "A" * 9999},
                    },
                ],
            },
        ]
    }
    # Role names count a little; the image counts as a fixed share, not its base64.
    assert 110 <= estimate_prompt_tokens("chat", chat) - IMAGE_TOKEN_ESTIMATE <= 115
    assert estimate_prompt_tokens("completions", {"prompt": ["abcd", "efgh"]}) == 2
    assert estimate_prompt_tokens("embeddings", {"input": [[1, 2, 3, 4]]}) == 4


def test_completion_estimates() -> None:
    assert estimate_completion_tokens("chat", {}) == DEFAULT_COMPLETION_ESTIMATE
    assert estimate_completion_tokens("chat", {"max_tokens": 10, "n": 3}) == 30
    assert estimate_completion_tokens("chat", {"max_completion_tokens": 7}) == 7
    assert estimate_completion_tokens("completions", {"prompt": ["a", "b"], "max_tokens": 5}) == 10
    assert estimate_completion_tokens("embeddings", {"max_tokens": 5}) == 0


@pytest.mark.parametrize(
    ("route", "body", "count"),
    [
        ("chat", {}, 1),
        ("chat", {"n": 3}, 3),
        ("chat", {"n": 3.0}, 3),  # as the handlers read it
        ("chat", {"n": 0}, 1),
        ("chat", {"n": True}, 1),
        ("completions", {"prompt": "a", "n": 2}, 2),
        ("completions", {"prompt": ["a", "b", "c"], "n": 2}, 6),
        ("completions", {"prompt": [[1, 2], [3]]}, 2),
        ("completions", {"prompt": [0, 5, 7]}, 1),  # one prompt of token ids
        ("embeddings", {"input": ["a", "b"], "n": 4}, 1),
    ],
)
def test_generation_counts(route: str, body: dict[str, object], count: int) -> None:
    assert generation_count(route, body) == count


def test_every_generation_is_estimated_and_counted() -> None:
    body = {"prompt": ["abcd", "efgh"], "n": 3, "max_tokens": 5}
    # Each choice reads its prompt: the usage summed over generations counts it n times.
    assert estimate_prompt_tokens("completions", body) == 2 * 3
    assert estimate_completion_tokens("completions", body) == 5 * 2 * 3
    spent = plan(
        ALICE,
        "qwen3",
        prompt_estimate=6,
        completion_estimate=30,
        now=0,
        lease_id="r",
        generations=6,
    )
    assert [(r.bucket, r.cost) for r in spent.rates if r.family == "requests"] == [
        ("cfg:alice:rpm", 6),
        ("cfg:alice:model:qwen3:rpm", 6),
    ]
    assert len(spent.leases) == 1  # still one request in flight


def test_a_request_of_too_many_generations_is_told_why() -> None:
    refusal = Refusal("rate", "cfg:alice:rpm", 5, 0, 8, family="requests")
    error = refusal_error(refusal, ALICE, [])
    assert "Limit 5, Requested 8" in error.message and "fewer choices (n)" in error.message
    assert error.headers["x-should-retry"] == "false"


def test_headers_show_the_tightest_bucket_of_each_family() -> None:
    headers = rate_headers(
        [
            RateState("a:rpm", "requests", 60, 59, 1.0),
            RateState("a:model:m:rpm", "requests", 5, 2, 36.0),
            RateState("a:tpm", "tokens", 40000, 39000, 1.5),
        ]
    )
    assert headers == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "36s",
        "x-ratelimit-limit-tokens": "40000",
        "x-ratelimit-remaining-tokens": "39000",
        "x-ratelimit-reset-tokens": "1.5s",
        "ratelimit-policy": '"requests";q=5;w=60, "tokens";q=40000;w=60',
        "ratelimit": '"requests";r=2;t=36, "tokens";r=39000;t=2',
    }
    assert rate_headers([]) == {}


def test_refusals_become_openai_429s() -> None:
    rates = [RateState("cfg:alice:rpm", "requests", 60, 0, 60.0)]
    busy = refusal_error(Refusal("rate", "cfg:alice:rpm", 60, 60, 1, "requests", 0.4), ALICE, rates)
    assert isinstance(busy, RateLimited) and busy.error_type == "requests"
    assert busy.code == "rate_limit_exceeded"
    assert busy.headers["retry-after"] == "1"
    assert busy.headers["retry-after-ms"] == "400"
    assert busy.headers["x-ratelimit-remaining-requests"] == "0"
    assert "Limit 60, Used 60, Requested 1" in busy.message
    assert "alice" in busy.message and "try again in 400ms" in busy.message

    too_big = refusal_error(
        Refusal("rate", "cfg:alice:tpm", 1000, 0, 5000, "tokens", None), ALICE, []
    )
    assert isinstance(too_big, TokenRateLimited) and too_big.error_type == "tokens"
    assert too_big.headers == {"x-should-retry": "false"}

    spent = refusal_error(Refusal("quota", "cfg:alice:day:2027-01-01", 10, 12, 5), ALICE, [])
    assert isinstance(spent, QuotaExceeded)
    assert (spent.status, spent.error_type, spent.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert spent.headers["x-should-retry"] == "false" and "daily" in spent.message

    crowded = refusal_error(Refusal("parallel", "cfg:alice:parallel", 2, 2, 1), ALICE, [])
    assert crowded.headers["retry-after"] == "1" and "parallel" in crowded.message


# -- the GCRA arithmetic every store shares ----------------------------------------


def test_a_bucket_lets_a_burst_through_then_refills() -> None:
    charge = RateCharge("b", "requests", 1, 10, 60.0)
    tat = None
    admitted = 0
    for _ in range(30):
        step = rate_step(tat, 1000.0, charge)
        if step.allowed:
            admitted += 1
            tat = step.tat
    assert admitted == 10
    refused = rate_step(tat, 1000.0, charge)
    assert not refused.allowed and refused.retry_after == pytest.approx(6.0)
    assert refused.remaining == 0 and refused.reset == pytest.approx(60.0)
    assert rate_step(tat, 1005.9, charge).allowed is False
    assert rate_step(tat, 1006.0, charge).allowed is True


def test_a_charge_above_the_limit_never_fits() -> None:
    step = rate_step(None, 0.0, RateCharge("b", "tokens", 101, 100))
    assert not step.allowed and step.retry_after is None


@given(
    limit=st.integers(1, 10_000),
    costs=st.lists(st.integers(1, 500), max_size=40),
    gaps=st.lists(st.floats(0, 30), max_size=40),
)
def test_a_bucket_never_admits_more_than_limit_plus_refill(
    limit: int, costs: list[int], gaps: list[float]
) -> None:
    now, tat, taken = 0.0, None, 0
    for cost, gap in zip(costs, gaps + [0.0] * len(costs), strict=False):
        now += gap
        step = rate_step(tat, now, RateCharge("b", "tokens", cost, limit))
        if step.allowed:
            taken += cost
            tat = step.tat
            assert 0 <= step.remaining <= limit
    assert taken <= limit + now * limit / 60.0 + 1e-6


def test_refunds_never_overfill_and_debts_delay() -> None:
    charge = RateCharge("b", "tokens", 100, 100)
    full = rate_step(None, 0.0, charge)
    assert full.allowed and full.remaining == 0
    refunded = rate_settle(full.tat, 0.0, RateCharge("b", "tokens", -1000, 100))
    assert refunded == 0.0  # no fuller than full
    debt = rate_settle(full.tat, 0.0, RateCharge("b", "tokens", 50, 100))
    assert debt == pytest.approx(90.0)  # 150 tokens at 100 a minute
    step = rate_step(debt, 0.0, RateCharge("b", "tokens", 1, 100))
    assert not step.allowed and step.retry_after == pytest.approx(30.6)
