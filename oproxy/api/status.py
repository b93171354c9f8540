"""
How the proxy is doing: ``/healthz``, ``/readyz``, ``/v1/health`` and
``/metrics``.
"""

from __future__ import annotations

import os

from oproxy.api.scope import Scope, client_address
from oproxy.health import probe_all, report
from oproxy.metrics import CONTENT_TYPE
from oproxy.security.guard import credential
from oproxy.security.scraping import check_scraper

_METRICS_TYPE = CONTENT_TYPE.encode("ascii")


async def liveness(scope: Scope) -> bytes | None:
    """Liveness: the process answers.  Nothing else is checked."""
    return scope.json({"status": "ok"})


async def readiness(scope: Scope) -> bytes | None:
    """Readiness: a backend answers, and the state store does (or the proxy fails open)."""
    services = scope.services
    found = await probe_all(scope.services.router.backends, services.clock, services.metrics)
    scope.services.router.note_probes(found)
    reachable = sum(1 for b in found if b.reachable)
    store = await services.guard.check()
    ready = reachable > 0 and (store["reachable"] or store["on_unavailable"] == "open")
    return scope.json(
        {
            "status": "ready" if ready else "not ready",
            "backends_reachable": reachable,
            "state_store_reachable": store["reachable"],
        },
        status=200 if ready else 503,
    )


async def health(scope: Scope) -> bytes | None:
    """
    The full picture; it names models, so it needs a key when keys exist,
    and names only the models that key may use.
    """
    services = scope.services
    found = await probe_all(scope.services.router.backends, services.clock, services.metrics)
    document = report(
        found,
        uptime_seconds=services.clock.seconds() - services.up_since,
        workers=scope.config.workers or os.cpu_count() or 1,
        state_store=await services.guard.check(),
        shows_model=scope.may_use,
    )
    if services.certificates is not None:
        certificates = services.certificates.health(services.clock.seconds())
        document["certificates"] = certificates
        if certificates["status"] != "ok" and document["status"] == "ok":
            document["status"] = "degraded"
    return scope.json(document, status=503 if document["status"] == "unavailable" else 200)


async def scrape(scope: Scope) -> bytes | None:
    """
    Prometheus metrics, over every worker process, for scrapers on the
    configured networks and holders of the metrics token or an admin key
    (:mod:`oproxy.security.scraping`).
    """
    request, config = scope.request, scope.config
    await check_scraper(
        scope.services.guard,
        config.auth,
        config.metrics,
        credential(request),
        client_address(request),
    )
    request.setHeader(b"content-type", _METRICS_TYPE)
    return scope.services.metrics.scrape()
