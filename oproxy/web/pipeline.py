"""
The steps every request goes through, in this order::

    request id ─► draining? ─► key ─► body ─► plugins' request hooks
      ─► handler ─► answer or error
      ─► (once the answer is sent) settle usage, count, log, completion hooks

Each step is a small function below, and :meth:`Pipeline.serve` runs them
in that order for the :class:`Endpoint` the route table matched; no route
has a way of its own.  Limits and quotas are charged when the handler asks
for its routes (:meth:`Scope.admitted_routes`), because they need the
model, which the handler reads from the body in its API's way.

The plugins (:mod:`oproxy.plugins`) join here rather than growing a second
path: their request hooks run between the body and the handler, their
response hooks where the handlers answer (:mod:`oproxy.api.answer`,
:mod:`oproxy.api.native`), their chunk hooks on the chunks the relays write
(SSE and NDJSON), and their completion hooks beside the counting, after
the answer is sent.  With no plugin enabled, the step is a look at an
empty tuple.  Pages (the console) are endpoints with their own handlers
and dialect.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from oproxy.api.scope import Scope, client_address
from oproxy.api.services import Services
from oproxy.errors import (
    OProxyError,
    ServerError,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from oproxy.metrics import Metrics
from oproxy.plugins.chain import Hooks
from oproxy.plugins.interface import Outcome
from oproxy.security.guard import credential
from oproxy.security.limits import Caller
from oproxy.web.access import access_record
from oproxy.web.body import read_json
from oproxy.web.dialects import OPENAI, Dialect

log = Logger()

#: What a route does with a request once the pipeline has read it: the
#: whole answer, or ``None`` for one it has written itself (a stream).
Handler = Callable[[Scope], Awaitable[bytes | None]]

#: How a route's caller is identified when not by a bearer key: the
#: console's pages and JSON by their session cookie.  It raises the typed
#: error of a refusal, as the key check does.
Identify = Callable[[Services, IRequest], Awaitable[Caller]]

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

#: A werkzeug path argument, ``<name>`` or ``<converter:name>``.
_ARGUMENT = re.compile(r"<(?:[^:>]+:)?([^>]+)>")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """
    One route served through the pipeline: a row of the route table.

    :ivar path: werkzeug's pattern (``/v1/models/<path:model_id>``); its
        arguments reach the handler as :attr:`Scope.params`.
    :ivar methods: the HTTP methods it answers.
    :ivar handler: what answers.
    :ivar dialect: how its errors are written.
    :ivar authenticates: whether the caller's key is checked first.
    :ivar json_body: whether the body is read as a JSON object first.
    :ivar label: the ``route`` label of its metrics; by default the path,
        its arguments written ``{name}`` (``/v1/models/{model_id}``), so
        every route is broken out and the labels stay bounded.
    :ivar counted: whether it shows in the request metrics and the access
        log; the scrape of those metrics does not count itself.
    :ivar identify: how the caller is identified, when not by its key
        (``authenticates`` still says whether anyone is).
    :ivar headers: headers every answer of the route carries, errors
        included (the console's security headers), set first.
    :ivar plugins: whether the plugins see its requests (those with a JSON
        body); key management is the operator's, not the plugins'.
    """

    path: str
    methods: tuple[str, ...]
    handler: Handler
    dialect: Dialect = OPENAI
    authenticates: bool = True
    json_body: bool = False
    label: str = ""
    counted: bool = True
    identify: Identify | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    plugins: bool = True

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", _ARGUMENT.sub(r"{\1}", self.path))


class Pipeline:
    """
    Serve endpoints with the services in force.

    :ivar services: what a request starting now gets; a reload replaces
        the record, and requests in flight keep the one they started with.
    :ivar draining: set while the process stops: answers close their
        connection.
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.draining = False

    async def serve(
        self, endpoint: Endpoint, request: IRequest, params: Mapping[str, str]
    ) -> bytes | None:
        services = self.services
        clock = services.clock
        started = clock.seconds()
        request_id = stamp_request_id(request)
        for name, value in endpoint.headers:
            request.setHeader(name, value)
        if self.draining:
            close_after_answer(request)
        counted = endpoint.counted
        scope: Scope | None = None
        hooks: Hooks | None = None
        error_kind: str | None = None
        abandoned = False
        if counted:
            services.metrics.in_flight.inc()
        try:
            if not endpoint.authenticates:
                caller = None
            elif endpoint.identify is not None:
                caller = await endpoint.identify(services, request)
            else:
                caller = await authenticate(services, request, endpoint.dialect.reads_x_api_key)
            body = read_json(request) if endpoint.json_body else {}
            if services.plugins and endpoint.json_body and endpoint.plugins:
                hooks = Hooks(
                    services.plugins,
                    clock,
                    services.metrics,
                    route=endpoint.label,
                    api=endpoint.dialect.name,
                    key=caller.name if caller is not None else None,
                    request_id=request_id,
                    started=started,
                )
                body = await hooks.request(body)
                if not hooks.active:
                    hooks = None
            scope = Scope(
                request, request_id, services, services.config, caller, body, started, params
            )
            if hooks is not None:
                scope.hooks = hooks
            return sized(request, await endpoint.handler(scope))
        except OProxyError as e:
            error_kind = e.code or e.error_type
            if counted:
                count_failure(services.metrics, e, scope)
            return sized(request, endpoint.dialect.respond(request, e))
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
                route=endpoint.label,
                model=scope.model_label if scope is not None else None,
                backend=scope.backend_label if scope is not None else None,
            )
            error_kind = "server_error"
            return sized(request, endpoint.dialect.respond(request, ServerError()))
        finally:
            if counted:
                services.metrics.in_flight.dec()
            if scope is not None:
                settle(services, scope, abandoned)
            if hooks is not None:
                services.after_send(
                    complete, hooks, request, scope, clock.seconds() - started, error_kind
                )
            if counted:
                elapsed = clock.seconds() - started
                services.after_send(
                    count_and_log,
                    services,
                    request,
                    endpoint.label,
                    scope,
                    started,
                    elapsed,
                    error_kind,
                )


# -- the steps, in order ----------------------------------------------------------


def new_request_id() -> str:
    return "req_" + secrets.token_hex(16)


def stamp_request_id(request: IRequest) -> str:
    """
    The request's id: the client's ``X-Request-Id`` when it is sane, else a
    fresh one.  The answer carries it.

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
    request.setHeader(b"x-request-id", request_id.encode("ascii"))
    return request_id


def close_after_answer(request: IRequest) -> None:
    """
    A stopping process wants its connections closed: Twisted closes one
    after the response when the request asked for that.
    """
    request.requestHeaders.setRawHeaders(b"connection", [b"close"])


async def authenticate(services: Services, request: IRequest, x_api_key: bool = False) -> Caller:
    """
    Who is calling, by key (or anonymous where that is allowed); the key may
    come as ``x-api-key`` where the route's API family sends it there.
    """
    return await services.guard.identify(
        services.config.auth, credential(request, x_api_key=x_api_key), client_address(request)
    )


def sized(request: IRequest, answer: bytes | None) -> bytes | None:
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


def count_failure(metrics: Metrics, error: OProxyError, scope: Scope | None) -> None:
    """Refusals, and failures that blame a backend, have metrics of their own."""
    if error.status in REJECTION_STATUSES:
        metrics.rejections.labels(error.code or error.error_type).inc()
    if isinstance(error, UPSTREAM_FAILURES):
        backend = scope.backend_label if scope is not None else "-"
        metrics.upstream_errors.labels(backend, error.code or "error").inc()


def settle(services: Services, scope: Scope, abandoned: bool) -> None:
    """
    The request no longer keeps its backend busy, and its limits and
    quotas are charged what it really used.
    """
    scope.release()
    if scope.ticket is not None:
        services.guard.settle(scope.ticket, scope.tokens_used(abandoned))


# -- after the answer is sent ------------------------------------------------------


def count_and_log(
    services: Services,
    request: IRequest,
    route: str,
    scope: Scope | None,
    started: float,
    elapsed: float,
    error_kind: str | None,
) -> None:
    """The request's metrics and its access log record."""
    metrics = services.metrics
    status = request.code  # type: ignore[attr-defined]
    # Only an answer from a backend vouches for a model name: a client
    # may send any string, and labels must stay bounded.
    model = scope.model_label if scope is not None and status < 400 else "-"
    backend = scope.backend_label if scope is not None else "-"
    metrics.requests.labels(route, model, backend, str(status)).inc()
    metrics.duration.labels(route).observe(elapsed)
    if scope is not None and scope.backend_label != "-":
        metrics.overhead.labels(route).observe(max(0.0, elapsed - scope.upstream_time.seconds))
    if services.access_log is not None:
        services.access_log.write(
            access_record(
                request, stamp_request_id(request), scope, status, started, elapsed, error_kind
            )
        )
    if error_kind == CLIENT_CLOSED_KIND:
        log_request_line(request)


def complete(
    hooks: Hooks,
    request: IRequest,
    scope: Scope | None,
    elapsed: float,
    error_kind: str | None,
) -> None:
    """The plugins' completion hooks: how the request ended."""
    model = backend = None
    if scope is not None:
        model = scope.model_label if scope.model_label != "-" else None
        backend = scope.backend_label if scope.backend_label != "-" else None
    hooks.complete(
        Outcome(
            status=request.code,  # type: ignore[attr-defined]
            error=error_kind,
            seconds=elapsed,
            first_token_seconds=scope.first_token_seconds if scope is not None else None,
            prompt_tokens=scope.prompt_tokens if scope is not None else None,
            completion_tokens=scope.completion_tokens if scope is not None else None,
            model=model,
            backend=backend,
            cache=scope.cache_status if scope is not None else None,
            streamed=hooks.streamed,
        )
    )


def log_request_line(request: IRequest) -> None:
    """
    The access line of a request whose client hung up.

    Twisted writes a request's line when the request finishes, which one
    whose connection is gone never does; the site (which knows where lines
    go, if anywhere) is asked directly instead.
    """
    site = getattr(request, "site", None)
    if site is not None:
        site.log(request)
