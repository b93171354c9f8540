"""
The route table, as data, and the Klein app built from it.

Every API route is an :class:`Endpoint` served through the pipeline
(:mod:`oproxy.web.pipeline`): its path and methods, its handler, the
dialect its errors are written in, whether it checks the caller's key and
reads a JSON body, and the ``route`` label of its metrics.  The API's own
documentation is served as it is (:class:`Document`, :class:`Files`).
Routing errors (no such path, a method the path does not take) are OpenAI
errors, whatever the path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet import defer
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect

from oproxy.api import (
    admin,
    admin_models,
    chat,
    completions,
    embeddings,
    messages,
    models,
    native,
    native_models,
    responses,
    status,
)
from oproxy.api.docs import OPENAPI_JSON, SWAGGER_PAGE, swagger_ui_files
from oproxy.console.routes import CONSOLE_ROUTES
from oproxy.errors import MethodNotAllowed, NotFound
from oproxy.web.dialects import ANTHROPIC, OLLAMA, OPENAI, Dialect, dialect_for_path
from oproxy.web.pipeline import Endpoint, Handler, Pipeline, stamp_request_id


@dataclass(frozen=True, slots=True)
class Document:
    """A fixed answer: the same bytes for everyone, with no request steps."""

    path: str
    content_type: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class Files:
    """A tree of packaged files under ``path``, made when first asked for."""

    path: str
    resource: Callable[[], IResource]


Route = Endpoint | Document | Files


def _native(
    path: str, handler: Handler, methods: tuple[str, ...] = ("POST",), *, json_body: bool = True
) -> Endpoint:
    """One of Ollama's native routes: its errors are Ollama's."""
    return Endpoint(path, methods, handler, OLLAMA, json_body=json_body)


ROUTES: tuple[Route, ...] = (
    # -- the OpenAI API
    Endpoint("/v1/chat/completions", ("POST",), chat.create, json_body=True),
    Endpoint("/v1/completions", ("POST",), completions.create, json_body=True),
    Endpoint("/v1/embeddings", ("POST",), embeddings.create, json_body=True),
    Endpoint("/v1/models", ("GET",), models.list_all),
    Endpoint("/v1/models/<path:model_id>", ("GET",), models.retrieve),
    # -- OpenAI's Responses API
    Endpoint("/v1/responses", ("POST",), responses.create, json_body=True),
    Endpoint("/v1/responses/<response_id>", ("GET",), responses.retrieve),
    Endpoint("/v1/responses/<response_id>", ("DELETE",), responses.delete),
    Endpoint("/v1/responses/<response_id>/input_items", ("GET",), responses.input_items),
    # -- Anthropic's Messages API: its errors are Anthropic's, its key may be x-api-key
    Endpoint("/v1/messages", ("POST",), messages.create, ANTHROPIC, json_body=True),
    Endpoint(
        "/v1/messages/count_tokens", ("POST",), messages.count_tokens, ANTHROPIC, json_body=True
    ),
    # -- key management (admin keys only)
    Endpoint("/admin/keys", ("GET",), admin.list_all),
    Endpoint("/admin/keys", ("POST",), admin.create, json_body=True, plugins=False),
    Endpoint("/admin/keys/<key_id>", ("GET",), admin.show, label="/admin/keys/{id}"),
    Endpoint("/admin/keys/<key_id>", ("DELETE",), admin.revoke, label="/admin/keys/{id}"),
    Endpoint(
        "/admin/keys/<key_id>/rotate", ("POST",), admin.rotate, label="/admin/keys/{id}/rotate"
    ),
    # -- loading and unloading models (admin keys only)
    Endpoint("/admin/models/load", ("POST",), admin_models.load, json_body=True),
    Endpoint("/admin/models/unload", ("POST",), admin_models.unload, json_body=True),
    # -- health and metrics
    Endpoint("/healthz", ("GET", "HEAD"), status.liveness, authenticates=False),
    Endpoint("/readyz", ("GET", "HEAD"), status.readiness, authenticates=False),
    Endpoint("/v1/health", ("GET",), status.health),
    # The scraper is checked by the handler (token, networks or admin key).
    Endpoint("/metrics", ("GET",), status.scrape, authenticates=False, counted=False),
    # -- the API's documentation
    Document("/openapi.json", b"application/json", OPENAPI_JSON),
    # Swagger UI, from packaged files: installations are often offline.
    Document("/docs", b"text/html; charset=utf-8", SWAGGER_PAGE),
    Files("/docs/", swagger_ui_files),
    # -- Ollama's native API: "Ollama is running", as its clients expect
    Endpoint("/", ("GET", "HEAD"), native_models.banner, authenticates=False),
    _native("/api/chat", native.chat),
    _native("/api/generate", native.generate),
    _native("/api/embed", native.embed),
    _native("/api/embeddings", native.embeddings),
    _native("/api/show", native.show),
    _native("/api/tags", native_models.tags, ("GET", "HEAD"), json_body=False),
    _native("/api/ps", native_models.ps, ("GET",), json_body=False),
    _native("/api/version", native_models.version, ("GET", "HEAD"), json_body=False),
    _native("/api/pull", native_models.pull),
    _native("/api/push", native_models.push),
    _native("/api/create", native_models.create),
    _native("/api/delete", native_models.delete, ("DELETE",)),
    _native("/api/copy", native_models.copy),
    # -- the admin console: pages and their JSON, by session (oproxy/console/)
    *CONSOLE_ROUTES,
)


def klein_app(pipeline: Pipeline, routes: Iterable[Route] = ROUTES) -> Klein:
    """The routes as a Klein app, each endpoint served through ``pipeline``."""
    app = Klein()
    for number, route in enumerate(routes):
        # werkzeug tells rules apart by their endpoint name.
        name = f"route-{number}"
        if isinstance(route, Endpoint):
            app.route(route.path, methods=list(route.methods), endpoint=name)(
                _serving(pipeline, route)
            )
        elif isinstance(route, Document):
            app.route(route.path, methods=["GET"], endpoint=name)(_document(route))
        else:
            app.route(route.path, branch=True, methods=["GET"], endpoint=name)(_files(route))
    app.handle_errors(RequestRedirect)(_relative_redirect)
    app.handle_errors(WerkzeugNotFound)(_not_found)
    app.handle_errors(WerkzeugMethodNotAllowed)(_method_not_allowed)
    return app


def _serving(pipeline: Pipeline, endpoint: Endpoint) -> Callable[..., defer.Deferred[bytes | None]]:
    serve = pipeline.serve

    def served(request: IRequest, **params: str) -> defer.Deferred[bytes | None]:
        return defer.Deferred.fromCoroutine(serve(endpoint, request, params))

    return served


def _document(document: Document) -> Callable[[IRequest], bytes]:
    def answer(request: IRequest) -> bytes:
        request.setHeader(b"content-type", document.content_type)
        return document.body

    return answer


def _files(files: Files) -> Callable[[IRequest], IResource]:
    def tree(request: IRequest) -> IResource:
        return files.resource()

    return tree


# -- errors Klein raises before a handler runs ----------------------------------------


def _relative_redirect(request: IRequest, failure: Any) -> bytes:
    """
    Routing's redirects (a path with an encoded slash that merges into
    another) with a relative ``Location``: werkzeug builds an absolute
    URL from the client's ``Host`` header, which must never be echoed
    back as somewhere to go.
    """
    stamp_request_id(request)
    target = urlsplit(failure.value.new_url)
    location = "/" + target.path.lstrip("/")
    if target.query:
        location += "?" + target.query
    request.setResponseCode(failure.value.code)
    request.setHeader(b"location", location.encode("utf-8"))
    request.setHeader(b"content-length", b"0")
    return b""


def _routing_dialect(request: IRequest) -> Dialect:
    """OpenAI's, but Anthropic's under Anthropic's API, whose clients read only that."""
    return ANTHROPIC if dialect_for_path(request.path) is ANTHROPIC else OPENAI


def _not_found(request: IRequest, failure: Any) -> bytes:
    stamp_request_id(request)
    path = request.path.decode("latin-1", "replace")
    return _routing_dialect(request).respond(request, NotFound(f"Unknown request URL: {path}."))


def _method_not_allowed(request: IRequest, failure: Any) -> bytes:
    stamp_request_id(request)
    method = request.method.decode("latin-1", "replace")
    allowed = failure.value.valid_methods or []
    if allowed:
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
    return _routing_dialect(request).respond(
        request, MethodNotAllowed(f"Method {method} is not allowed on this route.")
    )
