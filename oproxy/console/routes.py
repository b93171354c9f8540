"""
The console's rows of the route table.

Pages and JSON are endpoints like any other, served through the same
pipeline; they identify the caller by the session cookie
(:func:`~oproxy.console.access.console_session`) instead of a bearer key,
and every answer carries the console's security headers.  Reading a page
or its figures is not counted as traffic (the dashboard asks every few
seconds); every change is, and so it is in the metrics and the access log
with the name of the key that made it.
"""

from __future__ import annotations

from oproxy.api import admin
from oproxy.console import editing, keys, models, pages, static, traffic
from oproxy.console.access import console_session
from oproxy.web.dialects import OPENAI, Dialect
from oproxy.web.pipeline import Endpoint, Handler

#: No script but ours, no inline script or style, no framing, no leaks.
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    b"object-src 'none'"
)

_PROTECTIONS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)

#: Every page and JSON answer: nothing with data is kept by a cache.
SECURITY_HEADERS = (*_PROTECTIONS, (b"cache-control", b"no-store"))
#: The packaged files (their handler says how long they may be kept).
STATIC_HEADERS = _PROTECTIONS


def _signed_in(
    path: str,
    methods: tuple[str, ...],
    handler: Handler,
    dialect: Dialect,
    *,
    counted: bool = True,
    json_body: bool = False,
) -> Endpoint:
    """
    A route for a signed-in console: the caller is the session's, and every
    answer carries the console's security headers.
    """
    return Endpoint(
        path,
        methods,
        handler,
        dialect,
        identify=console_session,
        counted=counted,
        json_body=json_body,
        headers=SECURITY_HEADERS,
    )


def _page(path: str, handler: Handler) -> Endpoint:
    """A page: looking at it is not traffic."""
    return _signed_in(path, ("GET", "HEAD"), handler, pages.PAGES, counted=False)


def _read(path: str, handler: Handler) -> Endpoint:
    """A page's figures, in JSON: the dashboard asks every few seconds, so not traffic."""
    return _signed_in(path, ("GET",), handler, OPENAI, counted=False)


def _change(
    path: str, handler: Handler, *, dialect: Dialect = OPENAI, json_body: bool = True
) -> Endpoint:
    """A change: counted, so it shows in the metrics and the access log."""
    return _signed_in(path, ("POST",), handler, dialect, json_body=json_body)


CONSOLE_ROUTES: tuple[Endpoint, ...] = (
    # -- pages
    Endpoint(
        "/ui/login",
        ("GET", "HEAD"),
        pages.login_form,
        pages.PAGES,
        authenticates=False,
        counted=False,
        headers=SECURITY_HEADERS,
    ),
    Endpoint(
        "/ui/login",
        ("POST",),
        pages.login,
        pages.PAGES,
        authenticates=False,
        headers=SECURITY_HEADERS,
    ),
    _change("/ui/logout", pages.logout, dialect=pages.PAGES, json_body=False),
    _page("/ui/", pages.dashboard),
    _page("/ui/models", pages.models),
    _page("/ui/keys", pages.keys),
    _page("/ui/configuration", pages.configuration),
    _page("/ui/requests", pages.requests),
    _page("/ui/requests/<request_id>", pages.request_record),
    Endpoint(
        "/ui/static/<name>",
        ("GET", "HEAD"),
        static.serve,
        authenticates=False,
        counted=False,
        headers=STATIC_HEADERS,
    ),
    # -- their JSON
    _read("/ui/api/dashboard", traffic.dashboard),
    _read("/ui/api/requests", traffic.requests),
    _read("/ui/api/requests/<request_id>", traffic.record),
    _read("/ui/api/models", models.listing),
    _change("/ui/api/models/pull", models.pull),
    _change("/ui/api/models/delete", models.delete),
    _change("/ui/api/models/load", models.load),
    _change("/ui/api/models/unload", models.unload),
    _read("/ui/api/keys", keys.listing),
    _change("/ui/api/keys", admin.create),
    _change("/ui/api/keys/<key_id>/revoke", admin.revoke, json_body=False),
    _change("/ui/api/keys/<key_id>/rotate", admin.rotate, json_body=False),
    _read("/ui/api/config", editing.show),
    _change("/ui/api/config/validate", editing.validate),
    _change("/ui/api/config/apply", editing.apply),
)
