"""
``POST /v1/completions``: the legacy text completions API.

A list of prompts and ``n`` choices run as separate generations, bounded
and joined by :mod:`oproxy.api.choices`; they are checked (and the request
refused with a 400) before the caller's limits are charged.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from oproxy.api.answer import answer
from oproxy.api.choices import requested_generations
from oproxy.api.scope import Scope
from oproxy.routing.router import Route


async def create(scope: Scope) -> bytes | None:
    generations = requested_generations("completions", scope.body, scope.config.limits)
    model, routes = await scope.admitted_routes("completions")

    async def produce(route: Route) -> dict[str, Any]:
        call = await scope.call(route)
        return await generations.answer(call, route.body(scope.body), route.backend.completion)

    async def produce_stream(route: Route) -> AsyncGenerator[dict[str, Any], None]:
        call = await scope.call(route)
        return await generations.stream(
            call, route.body(scope.body), route.backend.completion_stream
        )

    return await answer(
        scope,
        "completions",
        model,
        routes,
        stream=scope.stream(),
        produce=produce,
        produce_stream=produce_stream,
    )
