"""
The keys page's JSON: every key, from the file and from the store, with
its policy, its usage today and this month against its quotas, and when it
was last used.

Creating, revoking and rotating are the admin API's own handlers
(:mod:`oproxy.api.admin`) on the console's routes: the same operations on
the same store as ``oproxy keys`` and ``/admin/keys``.
"""

from __future__ import annotations

from typing import Any

from oproxy.api.scope import Scope
from oproxy.console.access import console_of
from oproxy.security.limits import periods
from oproxy.security.policy import KeyPolicy, PolicyError, policy_from_json, policy_to_json
from oproxy.security.records import describe, iso_time


async def listing(scope: Scope) -> bytes | None:
    """``GET /ui/api/keys``."""
    console = console_of(scope.services)
    store = scope.services.guard.store
    now = scope.services.clock.seconds()
    day, _, month, _ = periods(now)
    last_used: dict[str, float] = {}
    if console.follower is not None:
        last_used = (await console.follower.fresh()).last_used
    totals = await console.totals.read(wait=0.0)
    tokens = {row["name"]: row for row in (totals or {}).get("by_key", [])}

    async def usage(subject: str, policy: KeyPolicy) -> dict[str, Any]:
        limits = policy.limits
        today = month_used = None
        if limits.daily_tokens is not None:
            today = await store.quota_used(f"{subject}:day:{day}")
        if limits.monthly_tokens is not None:
            month_used = await store.quota_used(f"{subject}:month:{month}")
        return {
            "today": today,
            "daily_quota": limits.daily_tokens,
            "this_month": month_used,
            "monthly_quota": limits.monthly_tokens,
        }

    def seen(name: str) -> dict[str, Any]:
        used = last_used.get(name)
        counted = tokens.get(name, {})
        return {
            "last_used": iso_time(used),
            "tokens_since_start": (counted.get("prompt_tokens") or 0)
            + (counted.get("completion_tokens") or 0),
        }

    rows = []
    for key in scope.config.auth.keys:
        status = "expired" if key.policy.expired(now) else "active"
        rows.append(
            {
                "id": None,
                "name": key.name,
                "source": "file",
                "status": status,
                "created": None,
                "revoked": None,
                "policy": policy_to_json(key.policy),
                "usage": await usage(f"cfg:{key.name}", key.policy),
                **seen(key.name),
            }
        )
    for record in await store.list_keys():
        described = describe(record, now)
        try:
            policy = policy_from_json(record.policy)
        except PolicyError:
            policy = KeyPolicy()
        rows.append(
            {
                **described,
                "source": "store",
                "usage": await usage(f"key:{record.key_id}", policy)
                if record.revoked is None
                else None,
                **seen(record.name),
            }
        )
    return scope.json(
        {
            "data": rows,
            "last_used_since": _horizon(console.follower is not None),
        }
    )


def _horizon(logged: bool) -> str:
    """What "last used" can know, said on the page."""
    if not logged:
        return "Last use is read from the JSON access log, which is not configured."
    return "Last use is read from the access log, as far back as the last hour."
