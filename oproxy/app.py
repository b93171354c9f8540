"""
The route table: one thin handler per API route.

Every handler goes through :meth:`ProxyApp._serve`, which gives the
response its request id, checks the caller's key, parses the JSON body and
turns any exception into an OpenAI error object (an Ollama one on Ollama's
native routes).  Handlers themselves only parse, delegate and render.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect

from oproxy.after_send import AfterSend
from oproxy.api import admin, chat, completions, embeddings, models, native, native_models
from oproxy.api.access import access_record
from oproxy.api.docs import OPENAPI_JSON, SWAGGER_PAGE, swagger_ui_files
from oproxy.api.scope import Scope
from oproxy.cache import ResponseCache
from oproxy.config import Config
from oproxy.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    OProxyError,
    RequestTooLarge,
    ServerError,
    UnsupportedMediaType,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    render_error,
)
from oproxy.health import probe_all, report
from oproxy.images.fetch import Images
from oproxy.logs import AccessLog
from oproxy.metrics import CONTENT_TYPE, Metrics
from oproxy.routing.router import Router
from oproxy.security.guard import Guard, credential
from oproxy.security.scraping import check_scraper

log = Logger()

#: Refusals counted as rejections: keys, permissions, body size, limits, quotas.
REJECTION_STATUSES = frozenset((401, 403, 413, 429))

#: The status recorded for a request whose client hung up before its answer
#: was complete (nginx's "client closed request"); it never reaches the wire.
CLIENT_CLOSED = 499
#: Its error kind in the access log.
CLIENT_CLOSED_KIND = "client_closed"

#: Failures that say something about a backend, counted per backend and kind.
UPSTREAM_FAILURES = (UpstreamError, UpstreamUnavailable, UpstreamBusy, UpstreamTimeout)

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

Handler = Callable[[Scope], Awaitable[bytes | None]]
#: Renders an error for the client: OpenAI's error object, or Ollama's.
ErrorRenderer = Callable[[IRequest, OProxyError], bytes]


def new_request_id() -> str:
    return "req_" + secrets.token_hex(16)


class ProxyApp:
    """
    The OpenAI API (and Ollama's native one, for Ollama's clients), served
    by Klein in front of a :class:`Router`.
    """

    app = Klein()

    def __init__(
        self,
        config: Config,
        router: Router,
        *,
        clock: IReactorTime,
        images: Images,
        cache: ResponseCache,
        metrics: Metrics,
        guard: Guard,
        access_log: AccessLog | None = None,
        after_send: AfterSend | None = None,
    ) -> None:
        self.config = config
        self.guard = guard
        self.metrics = metrics
        self.access_log = access_log
        self.router = router
        self.cache = cache
        self.clock = clock
        #: Counting and logging wait until the answer is on its way.
        self.after_send = after_send or AfterSend(clock)
        #: Fetches and converts the images of chat requests.
        self.images = images
        #: Set while the process stops: answers close their connection.
        self.draining = False
        self.started = clock.seconds()

    def swap(self, config: Config, router: Router, cache: ResponseCache) -> None:
        """Make a new configuration live; requests in flight keep theirs."""
        self.config, self.router, self.cache = config, router, cache

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    async def _serve(
        self,
        request: IRequest,
        handler: Handler,
        *,
        json_body: bool,
        auth: bool = True,
        route: str = "-",
        errors: ErrorRenderer | None = None,
    ) -> bytes | None:
        """
        :param errors: how errors are rendered; OpenAI's error object unless
            the route speaks another API (Ollama's native routes).
        """
        render = errors or _error_response
        config, router = self.config, self.router
        started = self.clock.seconds()
        request_id = _request_id(request)
        request.setHeader(b"x-request-id", request_id.encode("ascii"))
        if self.draining:
            # Twisted closes the connection after the response when the
            # request asked for it; a stopping process wants exactly that.
            request.requestHeaders.setRawHeaders(b"connection", [b"close"])
        scope: Scope | None = None
        error_kind: str | None = None
        abandoned = False
        self.metrics.in_flight.inc()
        try:
            caller = (
                await self.guard.identify(config.auth, credential(request), client_address(request))
                if auth
                else None
            )
            body = _read_json(request) if json_body else {}
            scope = Scope(
                app=self,
                request=request,
                request_id=request_id,
                config=config,
                router=router,
                caller=caller,
                body=body,
                started=started,
            )
            return _sized(request, await handler(scope))
        except OProxyError as e:
            error_kind = e.code or e.error_type
            if e.status in REJECTION_STATUSES:
                self.metrics.rejections.labels(error_kind).inc()
            if isinstance(e, UPSTREAM_FAILURES):
                backend = scope.backend_label if scope is not None else "-"
                self.metrics.upstream_errors.labels(backend, e.code or "error").inc()
            return _sized(request, render(request, e))
        except defer.CancelledError:
            # Klein cancels a handler only when its request's connection is
            # lost: the cancellation has closed the upstream connection, and
            # the request is the client's doing, not a failure of ours.
            abandoned = True
            error_kind = CLIENT_CLOSED_KIND
            request.setResponseCode(CLIENT_CLOSED, b"Client Closed Request")
            raise
        except Exception:
            log.failure(
                "Unhandled error serving {method} {path} ({request_id})",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
                request_id=request_id,
                route=route,
                model=scope.model_label if scope is not None else None,
                backend=scope.backend_label if scope is not None else None,
            )
            error_kind = "server_error"
            return _sized(request, render(request, ServerError()))
        finally:
            self.metrics.in_flight.dec()
            if scope is not None:
                scope.release()
            if scope is not None and scope.ticket is not None:
                self.guard.settle(scope.ticket, scope.tokens_used(abandoned))
            elapsed = self.clock.seconds() - started
            self.after_send(self._count, request, route, scope, started, elapsed, error_kind)

    def _count(
        self,
        request: IRequest,
        route: str,
        scope: Scope | None,
        started: float,
        elapsed: float,
        error_kind: str | None,
    ) -> None:
        status = request.code  # type: ignore[attr-defined]
        # Only an answer from a backend vouches for a model name: a client
        # may send any string, and labels must stay bounded.
        model = scope.model_label if scope is not None and status < 400 else "-"
        backend = scope.backend_label if scope is not None else "-"
        self.metrics.requests.labels(route, model, backend, str(status)).inc()
        self.metrics.duration.labels(route).observe(elapsed)
        if scope is not None and scope.backend_label != "-":
            self.metrics.overhead.labels(route).observe(
                max(0.0, elapsed - scope.upstream_time.seconds)
            )
        if self.access_log is not None:
            self.access_log.write(
                access_record(
                    request, _request_id(request), scope, status, started, elapsed, error_kind
                )
            )
        if error_kind == CLIENT_CLOSED_KIND:
            _log_request_line(request)

    # -- OpenAI routes -----------------------------------------------------

    @app.route("/v1/chat/completions", methods=["POST"])
    def chat_completions(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(
            self._serve(request, chat.create, json_body=True, route="/v1/chat/completions")
        )

    @app.route("/v1/completions", methods=["POST"])
    def completions(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(
            self._serve(request, completions.create, json_body=True, route="/v1/completions")
        )

    @app.route("/v1/embeddings", methods=["POST"])
    def embeddings(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(self._serve(request, embeddings.create, json_body=True))

    @app.route("/v1/models", methods=["GET"])
    def list_models(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(
            self._serve(request, models.list_all, json_body=False, route="/v1/models")
        )

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    def retrieve_model(self, request: IRequest, model_id: str) -> defer.Deferred[bytes | None]:
        async def handler(scope: Scope) -> bytes | None:
            return await models.retrieve(scope, model_id)

        return defer.Deferred.fromCoroutine(self._serve(request, handler, json_body=False))

    # -- key management (admin keys only) ------------------------------------

    @app.route("/admin/keys", methods=["GET"])
    def admin_list_keys(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(
            self._serve(request, admin.list_all, json_body=False, route="/admin/keys")
        )

    @app.route("/admin/keys", methods=["POST"])
    def admin_create_key(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(
            self._serve(request, admin.create, json_body=True, route="/admin/keys")
        )

    @app.route("/admin/keys/<key_id>", methods=["GET", "DELETE"])
    def admin_key(self, request: IRequest, key_id: str) -> defer.Deferred[bytes | None]:
        action = admin.show if request.method == b"GET" else admin.revoke

        async def handler(scope: Scope) -> bytes | None:
            return await action(scope, key_id)

        return defer.Deferred.fromCoroutine(
            self._serve(request, handler, json_body=False, route="/admin/keys/{id}")
        )

    @app.route("/admin/keys/<key_id>/rotate", methods=["POST"])
    def admin_rotate_key(self, request: IRequest, key_id: str) -> defer.Deferred[bytes | None]:
        async def handler(scope: Scope) -> bytes | None:
            return await admin.rotate(scope, key_id)

        return defer.Deferred.fromCoroutine(
            self._serve(request, handler, json_body=False, route="/admin/keys/{id}/rotate")
        )

    # -- health ----------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    def liveness(self, request: IRequest) -> defer.Deferred[bytes | None]:
        """Liveness: the process answers.  Nothing else is checked."""

        async def handler(scope: Scope) -> bytes | None:
            return scope.json({"status": "ok"})

        return defer.Deferred.fromCoroutine(
            self._serve(request, handler, json_body=False, auth=False)
        )

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readiness(self, request: IRequest) -> defer.Deferred[bytes | None]:
        """Readiness: a backend answers, and the state store does (or the proxy fails open)."""

        async def handler(scope: Scope) -> bytes | None:
            found = await probe_all(scope.router.backends, self.clock, self.metrics)
            scope.router.note_probes(found)
            reachable = sum(1 for b in found if b.reachable)
            store = await self.guard.check()
            ready = reachable > 0 and (store["reachable"] or store["on_unavailable"] == "open")
            return scope.json(
                {
                    "status": "ready" if ready else "not ready",
                    "backends_reachable": reachable,
                    "state_store_reachable": store["reachable"],
                },
                status=200 if ready else 503,
            )

        return defer.Deferred.fromCoroutine(
            self._serve(request, handler, json_body=False, auth=False)
        )

    @app.route("/v1/health", methods=["GET"])
    def health(self, request: IRequest) -> defer.Deferred[bytes | None]:
        """
        The full picture; it names models, so it needs a key when keys exist,
        and names only the models that key may use.
        """

        async def handler(scope: Scope) -> bytes | None:
            found = await probe_all(scope.router.backends, self.clock, self.metrics)
            document = report(
                found,
                uptime_seconds=self.clock.seconds() - self.started,
                workers=scope.config.workers or os.cpu_count() or 1,
                state_store=await self.guard.check(),
                shows_model=scope.may_use,
            )
            return scope.json(document, status=503 if document["status"] == "unavailable" else 200)

        return defer.Deferred.fromCoroutine(self._serve(request, handler, json_body=False))

    @app.route("/metrics", methods=["GET"])
    def scrape(self, request: IRequest) -> defer.Deferred[bytes]:
        """
        Prometheus metrics, over every worker process, for scrapers on the
        configured networks and holders of the metrics token or an admin key.
        """
        config = self.config

        async def answer() -> bytes:
            try:
                await check_scraper(
                    self.guard,
                    config.auth,
                    config.metrics,
                    credential(request),
                    client_address(request),
                )
            except OProxyError as e:
                return _error_response(request, e)
            except defer.CancelledError:
                raise  # the scraper went away
            except Exception:
                log.failure("Unhandled error checking a /metrics scraper")
                return _error_response(request, ServerError())
            request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
            return self.metrics.scrape()

        return defer.Deferred.fromCoroutine(answer())

    # -- API documentation --------------------------------------------------

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return OPENAPI_JSON

    @app.route("/docs", methods=["GET"])
    def docs(self, request: IRequest) -> bytes:
        """Swagger UI, from packaged files: installations are often offline."""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return SWAGGER_PAGE

    @app.route("/docs/", branch=True, methods=["GET"])
    def docs_assets(self, request: IRequest) -> IResource:
        return swagger_ui_files()

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> defer.Deferred[bytes | None]:
        """``Ollama is running``, as Ollama clients expect; JSON when asked for."""
        return defer.Deferred.fromCoroutine(
            self._serve(request, native_models.banner, json_body=False, auth=False)
        )

    # -- Ollama's native API -------------------------------------------------

    def _native(
        self, request: IRequest, handler: Handler, route: str, *, json_body: bool = True
    ) -> defer.Deferred[bytes | None]:
        """Serve a native route: like the others, but errors are Ollama's."""
        return defer.Deferred.fromCoroutine(
            self._serve(
                request, handler, json_body=json_body, route=route, errors=native.render_error
            )
        )

    @app.route("/api/chat", methods=["POST"])
    def ollama_chat(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native.chat, "/api/chat")

    @app.route("/api/generate", methods=["POST"])
    def ollama_generate(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native.generate, "/api/generate")

    @app.route("/api/embed", methods=["POST"])
    def ollama_embed(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native.embed, "/api/embed")

    @app.route("/api/embeddings", methods=["POST"])
    def ollama_embeddings(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native.embeddings, "/api/embeddings")

    @app.route("/api/show", methods=["POST"])
    def ollama_show(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native.show, "/api/show")

    @app.route("/api/tags", methods=["GET", "HEAD"])
    def ollama_tags(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.tags, "/api/tags", json_body=False)

    @app.route("/api/ps", methods=["GET"])
    def ollama_ps(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.ps, "/api/ps", json_body=False)

    @app.route("/api/version", methods=["GET", "HEAD"])
    def ollama_version(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.version, "/api/version", json_body=False)

    @app.route("/api/pull", methods=["POST"])
    def ollama_pull(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.pull, "/api/pull")

    @app.route("/api/push", methods=["POST"])
    def ollama_push(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.push, "/api/push")

    @app.route("/api/create", methods=["POST"])
    def ollama_create(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.create, "/api/create")

    @app.route("/api/delete", methods=["DELETE"])
    def ollama_delete(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.delete, "/api/delete")

    @app.route("/api/copy", methods=["POST"])
    def ollama_copy(self, request: IRequest) -> defer.Deferred[bytes | None]:
        return self._native(request, native_models.copy, "/api/copy")

    # -- errors Klein raises before a handler runs -------------------------

    @app.handle_errors(RequestRedirect)
    def relative_redirect(self, request: IRequest, failure: Any) -> bytes:
        """
        Routing's redirects (a path with an encoded slash that merges into
        another) with a relative ``Location``: werkzeug builds an absolute
        URL from the client's ``Host`` header, which must never be echoed
        back as somewhere to go.
        """
        request.setHeader(b"x-request-id", _request_id(request).encode("ascii"))
        target = urlsplit(failure.value.new_url)
        location = "/" + target.path.lstrip("/")
        if target.query:
            location += "?" + target.query
        request.setResponseCode(failure.value.code)
        request.setHeader(b"location", location.encode("utf-8"))
        request.setHeader(b"content-length", b"0")
        return b""

    @app.handle_errors(WerkzeugNotFound)
    def not_found(self, request: IRequest, failure: Any) -> bytes:
        request.setHeader(b"x-request-id", _request_id(request).encode("ascii"))
        path = request.path.decode("latin-1", "replace")
        return _error_response(request, NotFound(f"Unknown request URL: {path}."))

    @app.handle_errors(WerkzeugMethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        request.setHeader(b"x-request-id", _request_id(request).encode("ascii"))
        method = request.method.decode("latin-1", "replace")
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        return _error_response(
            request, MethodNotAllowed(f"Method {method} is not allowed on this route.")
        )


def client_address(request: IRequest) -> str:
    """The peer's IP address (``unix`` for a Unix socket peer)."""
    return getattr(request.getClientAddress(), "host", None) or "unix"


def _log_request_line(request: IRequest) -> None:
    """
    The access line of a request whose client hung up.

    Twisted writes a request's line when the request finishes, which one
    whose connection is gone never does; the site (which knows where lines
    go, if anywhere) is asked directly instead.
    """
    site = getattr(request, "site", None)
    if site is not None:
        site.log(request)


def _sized(request: IRequest, answer: bytes | None) -> bytes | None:
    """
    A whole answer goes out with its ``Content-Length``, as OpenAI's do.

    Without it Twisted would send it in chunked encoding: more bytes, a
    second write for the last chunk, and more parsing for every client.
    A stream (``None``: written already, or still being written) keeps the
    chunked encoding.
    """
    if answer is not None:
        request.setHeader(b"content-length", b"%d" % len(answer))
    return answer


def _request_id(request: IRequest) -> str:
    """
    The client's ``X-Request-Id`` when it is sane, else a fresh one.

    Remembered on the request so every part of one exchange uses the same id.
    """
    known = getattr(request, "oproxy_request_id", None)
    if isinstance(known, str):
        return known
    sent = request.getHeader(b"x-request-id")
    request_id = (
        sent.decode("ascii")
        if sent and _CLIENT_REQUEST_ID.match(sent.decode("latin-1"))
        else new_request_id()
    )
    request.oproxy_request_id = request_id  # type: ignore[attr-defined]
    return request_id


def _read_json(request: IRequest) -> dict[str, Any]:
    """
    The request body as a JSON object, or a clear 400/413/415.
    """
    if getattr(request, "body_too_large", False):
        limit = getattr(request, "max_body_bytes", 0)
        raise RequestTooLarge(f"Request body is larger than the limit of {limit} bytes.")
    content = request.content
    raw = content.read() if content is not None else b""
    if not raw.strip():
        raise InvalidRequest(
            "We could not parse the JSON body of your request: the body is empty.",
            code="invalid_json",
        )
    _require_json_media_type(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request. ({e})", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


#: Ollama's own documentation posts with ``curl -d``, which says it sends a form.
_FORM = b"application/x-www-form-urlencoded"


def _media_type(content_type: bytes) -> bytes:
    return content_type.split(b";", 1)[0].strip().lower()


def _require_json_media_type(request: IRequest) -> None:
    """
    Refuse a body that does not say it is JSON, with ``415``.

    A web page may make a browser send a form (``text/plain``, URL-encoded
    or multipart) to any site without asking it first; only a JSON
    ``Content-Type`` makes the browser ask (CORS), and oproxy answers no
    such question.  Were form bodies parsed as JSON, any page its users
    visit could drive a proxy that has no keys.  So JSON routes take
    ``application/json`` and ``+json`` types (with parameters), and
    otherwise only what no page can send:

    * no ``Content-Type`` at all, from a client that is not a browser (no
      ``Origin`` header: a browser sends one with every cross-site
      ``POST``), as scripts posting a JSON string without a header do;
    * on Ollama's native routes, URL-encoded bodies from such a client too,
      because ``curl -d`` sends that and is how Ollama's users call them.
    """
    content_type = request.getHeader(b"content-type")
    media_type = _media_type(content_type) if content_type is not None else None
    if media_type is not None and (
        media_type == b"application/json" or (media_type.endswith(b"+json") and b"/" in media_type)
    ):
        return
    from_a_page = request.getHeader(b"origin") is not None
    if not from_a_page and (
        media_type is None or (media_type == _FORM and request.path.startswith(b"/api/"))
    ):
        return
    sent = "none" if media_type is None else f"`{media_type.decode('latin-1')}`"
    raise UnsupportedMediaType(
        f"Unsupported Content-Type {sent}: this route takes a JSON body, "
        "sent with `Content-Type: application/json`."
    )


def _error_response(request: IRequest, error: OProxyError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in error.headers.items():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return render_error(error)
