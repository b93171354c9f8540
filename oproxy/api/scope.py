"""
What a handler gets: the request, who sent it, its parsed body, the
configuration snapshot, and the services it may use (:class:`Services`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from twisted.web.iweb import IRequest

from oproxy.api.services import Services
from oproxy.backends.base import Call, IInlineImages
from oproxy.config import Config
from oproxy.errors import InvalidRequest
from oproxy.images.fetch import too_many_images
from oproxy.plugins.chain import Hooks
from oproxy.routing.router import Route
from oproxy.security.guard import Ticket
from oproxy.security.limits import Caller
from oproxy.translate.chat import image_parts
from oproxy.upstream import UpstreamTime


@dataclass
class Scope:
    """
    One request in flight.

    :ivar services: what the request may use, as they were when it began:
        a reload does not change them under its feet.
    :ivar config: the configuration snapshot of those services.
    """

    request: IRequest
    request_id: str
    services: Services
    config: Config
    #: Who is calling; ``None`` on routes that do not authenticate.
    caller: Caller | None
    body: dict[str, Any]
    #: When the request reached the app (the reactor's clock).
    started: float = 0.0
    #: The route's path arguments (``/v1/models/<path:model_id>``).
    params: Mapping[str, str] = field(default_factory=dict)
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
    #: The request's limits and quotas, charged on admission, settled at the end.
    ticket: Ticket | None = None
    #: Completion tokens of a stream cut short, counted from what was generated.
    partial_completion_tokens: int = 0
    #: The route being tried or answering, counted as busy until the request ends.
    route_in_use: Route | None = None
    #: A chat's images, fetched and converted once for every route tried.
    prepared_images: Mapping[str, str] | None = None
    #: The plugins that apply to the request, for its answer, its chunks and
    #: its completion (``None``: no plugin does).
    hooks: Hooks | None = None

    @property
    def logs_bodies(self) -> bool:
        return self.config.access_log is not None and self.config.access_log.bodies

    def overhead(self) -> float:
        """Seconds so far not spent waiting for an upstream."""
        elapsed = self.services.clock.seconds() - self.started
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

    @property
    def key_name(self) -> str | None:
        return self.caller.name if self.caller is not None else None

    def may_use(self, model: str) -> bool:
        """Whether the caller's key allows ``model`` (lists show only those)."""
        return self.caller is None or self.caller.policy.allows_model(model)

    async def admitted_routes(
        self, route_name: str, body: Mapping[str, Any] | None = None
    ) -> tuple[str, list[Route]]:
        """
        The body's model, once the caller may use it and its limits have
        room, and the routes to try for it, best first.

        The permission check comes before routing, so a key cannot learn
        which models exist beyond those it may use.

        :param body: what the routes will be sent, when it is not the
            client's body (a chat request translated from another API):
            the charge is estimated from it, as ``route_name`` reads it.
        """
        model = self.model()
        if self.caller is not None:
            self.ticket = await self.services.guard.admit(
                self.caller,
                model,
                route_name,
                self.body if body is None else body,
                self.request_id,
            )
            if self.ticket is not None:
                for name, value in self.ticket.headers.items():
                    self.request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return model, await self.services.router.routes(model)

    # -- what dispatch tells the request about its routes -------------------------

    def trying(self, route: Route) -> None:
        self.release()
        self.route_in_use = route
        self.services.router.started(route)
        self.model_label, self.backend_label = route.upstream_model, route.backend.name

    def gave_up(self, route: Route) -> None:
        self.release()

    def answered_by(self, route: Route) -> None:
        self.request.setHeader(b"x-oproxy-backend", route.backend.name.encode("utf-8"))

    def release(self) -> None:
        """The request no longer keeps its backend busy."""
        if self.route_in_use is not None:
            self.services.router.finished(self.route_in_use)
            self.route_in_use = None

    def tokens_used(self, abandoned: bool) -> int | None:
        """
        What to settle the request's token reservation at: the backend's
        usage when it gave one, else what a cut stream generated, else
        nothing for a failure or a cache hit.  ``None`` (keep the estimate)
        when the client left before anything could be counted: the backend
        may have worked regardless.
        """
        if self.prompt_tokens is not None or self.completion_tokens is not None:
            return (self.prompt_tokens or 0) + (self.completion_tokens or 0)
        if self.partial_completion_tokens and self.ticket is not None:
            return self.ticket.plan.prompt_estimate + self.partial_completion_tokens
        if abandoned and self.cache_status != "HIT":
            return None
        return 0

    async def _images_for(self, route: Route, body: Mapping[str, Any]) -> Mapping[str, str]:
        """
        A chat's images for ``route``: counted against
        ``images.max_per_request`` whatever the backend, and for Ollama,
        which takes only inline images it can read (:class:`IInlineImages`),
        fetched and converted (once, should another route be tried).
        """
        parts = image_parts(body)
        if len(parts) > self.config.images.max_per_request:
            raise too_many_images(len(parts), self.config.images, "messages")
        if not parts or not IInlineImages.providedBy(route.backend):
            return {}
        if self.prepared_images is None:
            self.prepared_images = await self.services.images.prepare(parts, self.config.images)
        return self.prepared_images

    async def call(
        self,
        route: Route,
        image_urls: list[str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Call:
        """
        The routed call, with a chat's images made ready.

        :param image_urls: a chat's remote image URLs, listed once its body
            was validated; ``None`` for other requests.
        :param body: the chat request, when it is not the client's body (a
            request translated from another API).
        """
        model = route.client_model
        chat = self.body if body is None else body
        images = await self._images_for(route, chat) if image_urls is not None else {}
        key_name = self.key_name

        def count(usage: Mapping[str, int]) -> None:
            self.prompt_tokens = usage.get("prompt_tokens", 0)
            self.completion_tokens = usage.get("completion_tokens", 0)
            self.services.metrics.count_tokens(usage, model=model, key=key_name)

        def count_partial(generated: int) -> None:
            self.partial_completion_tokens += generated
            self.services.metrics.count_tokens(
                {"completion_tokens": generated}, model=model, key=key_name
            )

        return Call(
            client_model=model,
            upstream_model=route.upstream_model,
            created=int(self.services.clock.seconds()),
            images=images,
            on_usage=count,
            on_cut_short=count_partial,
            upstream_time=self.upstream_time,
        )


def client_address(request: IRequest) -> str:
    """The peer's IP address (``unix`` for a Unix socket peer)."""
    return getattr(request.getClientAddress(), "host", None) or "unix"
