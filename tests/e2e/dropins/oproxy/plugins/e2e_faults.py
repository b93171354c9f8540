"""
``faults``: a plugin that fails or hangs in the hook its request names, for
the end-to-end tests (dropped in: this directory is on the daemon's path).

A request whose last message says ``fail-request``, ``hang-response``,
``fail-chunk``... has that hook raise or never answer; others pass.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from oproxy.plugins.interface import (
    Exchange,
    IChunkHook,
    IRequestHook,
    IResponseHook,
    PluginFactory,
)


@implementer(IRequestHook, IResponseHook, IChunkHook)
class Faults:
    def _act(self, exchange: Exchange, phase: str) -> Any:
        order = exchange.state.get("order", "")
        if order == f"fail-{phase}":
            raise RuntimeError(f"the faults plugin was told to fail in {phase}")
        if order == f"hang-{phase}":
            return defer.Deferred()
        return None

    def on_request(self, exchange: Exchange, body: dict[str, Any]) -> Any:
        messages = body.get("messages") or [{}]
        said = str(messages[-1].get("content", ""))
        exchange.state["order"] = said.split()[-1] if said.split() else ""
        return self._act(exchange, "request")

    def on_response(self, exchange: Exchange, answer: dict[str, Any]) -> Any:
        return self._act(exchange, "response")

    def on_chunk(self, exchange: Exchange, chunk: dict[str, Any] | None) -> Any:
        if chunk is None:
            return None
        exchange.state["chunks"] = exchange.state.get("chunks", 0) + 1
        # Fail at the third chunk: the stream has begun.
        return self._act(exchange, "chunk") if exchange.state["chunks"] == 3 else None


faults = PluginFactory("faults", lambda options, environment: Faults())
