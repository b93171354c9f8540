"""
Rate limits and quotas as arithmetic: what a request is charged, what the
client is told.

Pure functions only.  :mod:`oproxy.security.guard` runs them against the
state store; everything about *which* buckets a request touches, how its
tokens are estimated, and how an answer or a refusal is rendered lives here.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from oproxy.errors import OProxyError, QuotaExceeded, RateLimited, TokenRateLimited
from oproxy.security.policy import KeyPolicy
from oproxy.state.base import Lease, QuotaCharge, RateCharge, RateState, Refusal

#: Completion tokens assumed for a request that does not cap them.
DEFAULT_COMPLETION_ESTIMATE = 256
#: Prompt tokens assumed for each image (a typical vision encoder's share).
IMAGE_TOKEN_ESTIMATE = 768
#: A parallel slot lapses this long after its last renewal (a dead process's slots free up).
LEASE_SECONDS = 60.0
#: What a refused parallel request is told to wait.
PARALLEL_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Caller:
    """
    Who is calling, once authenticated.

    :ivar subject: the prefix of every bucket the caller is charged in:
        ``cfg:<name>`` for a key from the config file, ``key:<id>`` for a
        stored key, ``ip:<address>`` for an anonymous caller.
    :ivar name: the key's name (``None`` for anonymous callers); the only
        thing about a key that logs and metrics ever show.
    """

    subject: str
    name: str | None
    policy: KeyPolicy


@dataclass(frozen=True)
class Plan:
    """Everything one request is charged before it runs."""

    rates: tuple[RateCharge, ...]
    quotas: tuple[QuotaCharge, ...]
    leases: tuple[Lease, ...]
    estimate: int
    prompt_estimate: int

    @property
    def empty(self) -> bool:
        return not (self.rates or self.quotas or self.leases)


def plan(
    caller: Caller,
    model: str | None,
    *,
    prompt_estimate: int,
    completion_estimate: int,
    now: float,
    lease_id: str,
    generations: int = 1,
) -> Plan:
    """
    The charges for one request by ``caller`` for ``model`` at ``now``.

    :param generations: what the request costs against ``rpm``: the
        generations it runs on the backends (see :func:`generation_count`),
        so that a list of prompts or ``n`` choices cannot pass as one
        request.  It still holds one parallel slot: it is one request in
        flight, and its own concurrency is bounded by the server.
    """
    estimate = prompt_estimate + completion_estimate
    limits = caller.policy.limits
    subject = caller.subject
    rates: list[RateCharge] = []
    if limits.rpm is not None:
        rates.append(RateCharge(f"{subject}:rpm", "requests", generations, limits.rpm))
    if limits.tpm is not None:
        rates.append(RateCharge(f"{subject}:tpm", "tokens", estimate, limits.tpm))
    per_model = caller.policy.limits_for_model(model) if model is not None else None
    if per_model is not None:
        _, model_limits = per_model
        where = f"{subject}:model:{model}"
        if model_limits.rpm is not None:
            rates.append(RateCharge(f"{where}:rpm", "requests", generations, model_limits.rpm))
        if model_limits.tpm is not None:
            rates.append(RateCharge(f"{where}:tpm", "tokens", estimate, model_limits.tpm))
    quotas: list[QuotaCharge] = []
    day, day_end, month, month_end = periods(now)
    if limits.daily_tokens is not None:
        quotas.append(QuotaCharge(f"{subject}:day:{day}", estimate, limits.daily_tokens, day_end))
    if limits.monthly_tokens is not None:
        quotas.append(
            QuotaCharge(f"{subject}:month:{month}", estimate, limits.monthly_tokens, month_end)
        )
    leases: tuple[Lease, ...] = ()
    if limits.max_parallel is not None:
        leases = (Lease(f"{subject}:parallel", lease_id, limits.max_parallel, now + LEASE_SECONDS),)
    return Plan(tuple(rates), tuple(quotas), leases, estimate, prompt_estimate)


def corrections(
    spent: Plan, actual_tokens: int
) -> tuple[tuple[RateCharge, ...], tuple[QuotaCharge, ...]]:
    """
    The charges that turn a plan's token estimate into what was really used.

    Request counts are never corrected: a request is a request.
    """
    delta = actual_tokens - spent.estimate
    if delta == 0:
        return (), ()
    rates = tuple(
        RateCharge(r.bucket, r.family, delta, r.limit, r.period)
        for r in spent.rates
        if r.family == "tokens"
    )
    quotas = tuple(QuotaCharge(q.bucket, delta, q.limit, q.period_end) for q in spent.quotas)
    return rates, quotas


def periods(now: float) -> tuple[str, float, str, float]:
    """The UTC day and month ``now`` falls in, with the time each ends."""
    tm = time.gmtime(now)
    day = f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}"
    midnight = now - (tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec) - (now % 1)
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    month_end = float(_utc_timestamp(year, month))
    return day, midnight + 86400.0, f"{tm.tm_year:04d}-{tm.tm_mon:02d}", month_end


def _utc_timestamp(year: int, month: int) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


# -- estimating tokens before the call -------------------------------------------


def choice_count(route: str, body: Mapping[str, Any]) -> int:
    """
    The choices (``n``) a chat or completions request asks for: each is a
    generation of its own.  Anything but a positive whole number counts as
    one (the handler refuses it before admission anyway).
    """
    if route not in ("chat", "completions"):
        return 1
    return _whole(body.get("n")) or 1


def prompt_count(route: str, body: Mapping[str, Any]) -> int:
    """
    The prompts of a completions request: a list's length, where a list of
    token ids is one prompt.
    """
    if route != "completions":
        return 1
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or not prompt or _is_token(prompt[0]):
        return 1
    return len(prompt)


def generation_count(route: str, body: Mapping[str, Any]) -> int:
    """
    The generations a request runs on the backends: every prompt times
    every choice.  Each counts as a request against ``rpm``.
    """
    return choice_count(route, body) * prompt_count(route, body)


def estimate_prompt_tokens(route: str, body: Mapping[str, Any]) -> int:
    """
    A deliberately simple guess at a prompt's tokens: text characters / 4,
    token arrays by length, a fixed share per image, times ``n`` (each
    choice is a generation that reads the prompt, and the usage reported
    is the sum over the generations).  The reservation is corrected by the
    real usage afterwards, so it needs to be sane, not exact.

    Ollama's native bodies are read too (``/api/generate``'s top-level
    ``images``, ``/api/embeddings``' ``prompt``), so the native routes are
    charged like their OpenAI counterparts.
    """
    if route == "chat":
        characters, images = _count(body.get("messages"))
        tools_characters, _ = _count(body.get("tools"))
        characters += tools_characters
    elif route == "completions":
        characters, images = _count(body.get("prompt"))
        images += _native_images(body.get("images"))
    else:
        characters, images = _count(body.get("input") if "input" in body else body.get("prompt"))
    once = math.ceil(characters / 4) + images * IMAGE_TOKEN_ESTIMATE
    return once * choice_count(route, body)


def _native_images(images: Any) -> int:
    """Ollama sends images as a list of base64 strings: each is an image, not text."""
    return len(images) if isinstance(images, list) else 0


def _count(node: Any) -> tuple[float, int]:
    """Characters of text (a token id counts as four) and images under ``node``."""
    if isinstance(node, str):
        return len(node), 0
    if isinstance(node, bool) or node is None:
        return 0, 0
    if isinstance(node, int | float):
        return 4, 0
    if isinstance(node, Mapping):
        if node.get("type") in ("image_url", "input_image") or "image_url" in node:
            return 0, 1
        characters, images = 0.0, 0
        for name, value in node.items():
            if name == "images":  # an Ollama message's base64 images
                images += _native_images(value)
                continue
            c, i = _count(value)
            characters, images = characters + c, images + i
        return characters, images
    if isinstance(node, list):
        characters, images = 0.0, 0
        for value in node:
            c, i = _count(value)
            characters, images = characters + c, images + i
        return characters, images
    return 0, 0


def estimate_completion_tokens(route: str, body: Mapping[str, Any]) -> int:
    """
    ``max_completion_tokens`` / ``max_tokens`` (else Ollama's
    ``options.num_predict``) for every generation (see
    :func:`generation_count`), or a default for each.
    """
    if route == "embeddings":
        return 0
    cap = DEFAULT_COMPLETION_ESTIMATE
    options = body.get("options")
    if isinstance(options, Mapping) and _positive_int(options.get("num_predict")):
        cap = options["num_predict"]
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if _positive_int(value):
            cap = value
    return cap * generation_count(route, body)


def _positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _whole(value: Any) -> int | None:
    """
    A positive whole number as an ``int``, also when sent as ``2.0`` (as
    JavaScript clients may, and as the handlers accept), else ``None``.
    """
    if _positive_int(value):
        return value
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    return None


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- what the client is told -------------------------------------------------------


def go_duration(seconds: float) -> str:
    """
    A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it:
    ``0s``, ``12ms``, ``1s``, ``17.28s``, ``6m0s``, ``1h2m3s``.
    """
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    millis = math.ceil(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs = f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_headers(rates: Iterable[RateState]) -> dict[str, str]:
    """
    OpenAI's six ``x-ratelimit-*`` headers and the IETF ``RateLimit-Policy``
    / ``RateLimit`` pair, from the tightest bucket of each family.
    """
    tightest: dict[str, RateState] = {}
    for state in rates:
        best = tightest.get(state.family)
        if best is None or (state.remaining, -state.reset) < (best.remaining, -best.reset):
            tightest[state.family] = state
    headers: dict[str, str] = {}
    policies, current = [], []
    for family in ("requests", "tokens"):
        chosen = tightest.get(family)
        if chosen is None:
            continue
        headers[f"x-ratelimit-limit-{family}"] = str(chosen.limit)
        headers[f"x-ratelimit-remaining-{family}"] = str(chosen.remaining)
        headers[f"x-ratelimit-reset-{family}"] = go_duration(chosen.reset)
        policies.append(f'"{family}";q={chosen.limit};w=60')
        current.append(f'"{family}";r={chosen.remaining};t={math.ceil(max(0.0, chosen.reset))}')
    if policies:
        headers["ratelimit-policy"] = ", ".join(policies)
        headers["ratelimit"] = ", ".join(current)
    return headers


_RATE_NAMES = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)"}


def refusal_error(refusal: Refusal, caller: Caller, rates: Sequence[RateState]) -> OProxyError:
    """The 429 a refused admission becomes, with headers the SDK's retry obeys."""
    who = (
        f"key '{caller.name}'" if caller.name is not None else "anonymous callers from your address"
    )
    headers = rate_headers(rates)
    if refusal.kind == "quota":
        period = "daily" if ":day:" in refusal.bucket else "monthly"
        headers["x-should-retry"] = "false"
        return QuotaExceeded(
            f"You exceeded the {period} token quota of {who}: Limit {refusal.limit}, "
            f"Used {refusal.used}. It resets at the start of the next UTC "
            f"{'day' if period == 'daily' else 'month'}.",
            headers=headers,
        )
    if refusal.kind == "parallel":
        wait = PARALLEL_RETRY_SECONDS
        headers.update(_retry_headers(wait))
        error = RateLimited(
            f"Too many parallel requests for {who}: Limit {refusal.limit}. "
            f"Please try again in {go_duration(wait)}.",
            headers=headers,
        )
        return error
    family = refusal.family or "requests"
    name = _RATE_NAMES[family]
    if refusal.retry_after is None:
        headers["x-should-retry"] = "false"
        advice = (
            "Ask for fewer tokens (max_tokens) or a shorter prompt."
            if family == "tokens"
            else "Ask for fewer choices (n) or send fewer prompts: each counts as a request."
        )
        return _typed(
            f"Request too large for {who} on {name}: Limit {refusal.limit}, "
            f"Requested {refusal.requested}. {advice}",
            family,
            headers,
        )
    headers.update(_retry_headers(refusal.retry_after))
    return _typed(
        f"Rate limit reached for {who} on {name}: Limit {refusal.limit}, "
        f"Used {refusal.used}, Requested {refusal.requested}. "
        f"Please try again in {go_duration(refusal.retry_after)}.",
        family,
        headers,
    )


def _typed(message: str, family: str, headers: dict[str, str]) -> RateLimited:
    """OpenAI's 429s say ``requests`` or ``tokens`` as their ``type``."""
    kind = TokenRateLimited if family == "tokens" else RateLimited
    return kind(message, headers=headers)


def _retry_headers(seconds: float) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }
