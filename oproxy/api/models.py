"""
``GET /v1/models`` and ``GET /v1/models/{model}``.

The list is the union of what every healthy backend serves (each model
``owned_by`` the first backend that lists it), plus the aliases the
config defines, filtered by what the caller's key may use.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from oproxy.api.dispatch import first_answer
from oproxy.api.scope import Scope
from oproxy.errors import ModelNotFound
from oproxy.routing.router import Route

#: How long ``/v1/models`` waits for the backends' listings: the first,
#: which the probe starts as the process starts (a list asked for at once
#: would otherwise lack that backend's models), and any it refreshes.
FIRST_LISTING_SECONDS = 3.0


async def list_all(scope: Scope) -> bytes | None:
    router = scope.services.router
    catalog = router.state.catalog
    # Neither a stale list nor the first one may hold the answer for long:
    # a backend that cannot list its models in time is left out this once.
    await router.refresh_models(FIRST_LISTING_SECONDS)
    await catalog.first_listings(router.backends, FIRST_LISTING_SECONDS)
    data: list[dict[str, Any]] = []
    listed: dict[str, dict[str, Any]] = {}
    for backend in router.backends:
        if router.state.breaker.is_open(backend.name):
            continue
        for model in catalog.models(backend.name):
            if model["id"] not in listed:
                listed[model["id"]] = model
                data.append(model)
    for rule in router.config.models:
        if rule.is_glob or rule.pattern in listed or rule.target is None:
            continue
        target = listed.get(rule.target) or listed.get(rule.target + ":latest")
        if target is not None:
            alias = {**target, "id": rule.pattern}
            listed[rule.pattern] = alias
            data.append(alias)
    return scope.json({"object": "list", "data": [m for m in data if scope.may_use(m["id"])]})


async def retrieve(scope: Scope) -> bytes | None:
    """
    Look one model up; ids may hold ``:`` and ``/``, raw or percent-encoded.
    """
    model_id = unquote(scope.params["model_id"])
    if not scope.may_use(model_id):
        raise ModelNotFound(model_id)
    routes = await scope.services.router.routes(model_id)
    routes = [r for r in routes if r.client_model == model_id]  # not a fallback's

    async def look_up(route: Route) -> dict[str, Any]:
        found = await route.backend.retrieve_model(route.upstream_model)
        return {**found, "id": model_id}

    return scope.json(await first_answer(scope, routes, look_up))
