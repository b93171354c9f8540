"""
The dashboard's figures and the requests page's records, as JSON
(``/ui/api/dashboard``, ``/ui/api/requests``, ``/ui/api/requests/<id>``).

Totals since the start come from the metrics, summed over every worker;
the last hour, per minute, and the recent requests from the JSON access
log every worker writes.  Either way the figures are the same whichever
worker answers.  The backends' state comes from what the background probes
already recorded: asking for the dashboard sends nothing upstream.
"""

from __future__ import annotations

from typing import Any

from oproxy.api.scope import Scope
from oproxy.console.access import console_of
from oproxy.console.follow import LogFollower
from oproxy.console.pages import find_record
from oproxy.console.tally import Filters, TrafficTally

#: The most records one answer lists.
MAX_LIMIT = 500

NO_ACCESS_LOG = (
    "Per-minute charts and recent requests come from the JSON access log, which is not "
    "configured. Add an access_log section to the configuration, for example "
    "access_log: {path: /var/log/oproxy/access.jsonl}, and restart the daemon."
)


def access_log_state(follower: LogFollower | None) -> dict[str, Any]:
    if follower is None:
        return {"configured": False, "advice": NO_ACCESS_LOG}
    return {
        "configured": True,
        "path": follower.path,
        "loading": follower.state == "loading",
        "progress": follower.progress,
    }


async def _tally(scope: Scope) -> TrafficTally | None:
    follower = console_of(scope.services).follower
    return await follower.fresh() if follower is not None else None


async def dashboard(scope: Scope) -> bytes | None:
    """Everything the dashboard shows, in one answer (it asks every few seconds)."""
    console = console_of(scope.services)
    now = scope.services.clock.seconds()
    tally = await _tally(scope)
    totals = await console.totals.read()
    return scope.json(
        {
            "generated": now,
            "up_since": scope.services.up_since,
            "access_log": access_log_state(console.follower),
            "minutes": tally.series(now) if tally is not None else [],
            "hour": tally.hour(now) if tally is not None else None,
            "since_start": (
                {k: v for k, v in totals.items() if k != "backends"} if totals is not None else None
            ),
            "backends": backends(scope, totals.get("backends", {}) if totals else {}),
            "recent": tally.recent(limit=15) if tally is not None else [],
        }
    )


def backends(scope: Scope, probed: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each backend as the probes left it: up or down, how fast, what is loaded."""
    router = scope.services.router
    state = router.state
    found = []
    for backend in router.backends:
        seen = probed.get(backend.name, {})
        up = seen.get("up")
        found.append(
            {
                "name": backend.name,
                "kind": backend.kind,
                "up": None if up is None else up >= 1,
                "circuit_open": state.breaker.is_open(backend.name),
                "probe_latency_seconds": seen.get("probe_latency_seconds"),
                "models": len(state.catalog.models(backend.name)),
                "loaded": state.catalog.loaded_models(backend.name),
            }
        )
    return found


def _arg(scope: Scope, name: str) -> str | None:
    values = (scope.request.args or {}).get(name.encode("ascii"))
    if not values:
        return None
    text = values[0].decode("utf-8", "replace").strip()
    return text or None


async def requests(scope: Scope) -> bytes | None:
    """``/ui/api/requests?key=&model=&status=&limit=``: recent records, newest first."""
    console = console_of(scope.services)
    tally = await _tally(scope)
    try:
        limit = max(1, min(MAX_LIMIT, int(_arg(scope, "limit") or 100)))
    except ValueError:
        limit = 100
    filters = Filters(_arg(scope, "key"), _arg(scope, "model"), _arg(scope, "status"))
    return scope.json(
        {
            "access_log": access_log_state(console.follower),
            "data": tally.recent(filters, limit) if tally is not None else [],
            "keys": sorted(tally.keys) if tally is not None else [],
            "models": sorted(tally.models) if tally is not None else [],
        }
    )


async def record(scope: Scope) -> bytes | None:
    """``/ui/api/requests/<request_id>``: the whole record, bodies included when logged."""
    return scope.json(await find_record(scope))
