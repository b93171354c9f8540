"""
Choosing the backend that serves a model.

Today every model goes to the first configured backend; aliases, patterns,
balancing and fallbacks grow here without the API layer noticing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from oproxy.backends.base import Backend


@dataclass(frozen=True)
class Route:
    """Where a request for a model goes, and what the backend calls that model."""

    backend: Backend
    upstream_model: str


class Router:
    """Map public model names to backends."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        if not backends:
            raise ValueError("a router needs at least one backend")
        self.backends = tuple(backends)

    def route(self, model: str) -> Route:
        return Route(backend=self.backends[0], upstream_model=model)
