"""
What a handler gets: the request, its parsed body, and the app's services.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from twisted.web.iweb import IRequest

from oproxy.backends.base import Call
from oproxy.config import APIKey, Config
from oproxy.errors import InvalidRequest
from oproxy.images import fetch_images
from oproxy.routing import Route, Router
from oproxy.upstream import UpstreamTime

if TYPE_CHECKING:
    from oproxy.app import ProxyApp


@dataclass
class Scope:
    """
    One request in flight.

    :ivar config: the configuration snapshot the request started with; a
        reload does not change it under the request's feet.
    """

    app: ProxyApp
    request: IRequest
    request_id: str
    config: Config
    router: Router
    key: APIKey | None
    body: dict[str, Any]
    #: When the request reached the app (the reactor's clock).
    started: float = 0.0
    #: What the access log and metrics say about the answer, once known.
    model_label: str = "-"
    backend_label: str = "-"
    cache_status: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_seconds: float | None = None
    upstream_time: UpstreamTime = field(default_factory=UpstreamTime)
    #: The answer, kept only when the access log records bodies.
    logged_response: Any = None

    @property
    def logs_bodies(self) -> bool:
        return self.config.access_log is not None and self.config.access_log.bodies

    def overhead(self) -> float:
        """Seconds so far not spent waiting for an upstream."""
        elapsed = self.app.clock.seconds() - self.started
        return max(0.0, elapsed - self.upstream_time.seconds)

    def json(self, payload: Any, status: int = 200) -> bytes:
        """Render a JSON answer."""
        self.request.setResponseCode(status)
        self.request.setHeader(b"content-type", b"application/json")
        return orjson.dumps(payload)

    def model(self) -> str:
        """The body's ``model``: required, a non-empty string."""
        model = self.body.get("model")
        if model is None:
            raise InvalidRequest(
                "you must provide a model parameter",
                param="model",
                code="missing_required_parameter",
            )
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequest(
                "model must be a non-empty string", param="model", code="invalid_type"
            )
        return model

    def stream(self) -> bool:
        """The body's ``stream`` flag (default false)."""
        stream = self.body.get("stream", False)
        if stream is None:
            return False
        if not isinstance(stream, bool):
            raise InvalidRequest("stream must be a boolean", param="stream", code="invalid_type")
        return stream

    def route(self, model: str) -> Route:
        return self.router.route(model)

    async def call(self, model: str, route: Route, image_urls: list[str] | None = None) -> Call:
        """The routed call, with any remote images fetched."""
        images = await fetch_images(
            image_urls or [],
            client=self.app.http_client,
            clock=self.app.clock,
            config=self.config.images,
        )
        key_name = self.key.name if self.key else None

        def count(usage: Mapping[str, int]) -> None:
            self.prompt_tokens = usage.get("prompt_tokens", 0)
            self.completion_tokens = usage.get("completion_tokens", 0)
            self.app.metrics.count_tokens(usage, model=model, key=key_name)

        return Call(
            client_model=model,
            upstream_model=route.upstream_model,
            created=int(self.app.clock.seconds()),
            images=images,
            on_usage=count,
            upstream_time=self.upstream_time,
        )
