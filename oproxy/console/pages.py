"""
The console's pages: sign-in and sign-out, the five pages behind the
navigation, and a request's record; and how a page tells an error (its own
dialect: a page, or the sign-in form when the session is missing or over).
"""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from twisted.logger import Logger
from twisted.web.iweb import IRequest

from oproxy.api.scope import Scope, client_address
from oproxy.console.access import (
    check_same_origin,
    clear_session_cookie,
    console_of,
    count_attempt,
    read_form,
    session_of,
    set_session_cookie,
    sign_in,
)
from oproxy.console.editor import Version, read_version
from oproxy.console.templates import Content, Layout, LoginContent, render
from oproxy.errors import NotFound, OProxyError, Unauthorized
from oproxy.security.policy import PolicyError, policy_from_json
from oproxy.web.dialects import Dialect

log = Logger()

HTML = b"text/html; charset=utf-8"


class PageDialect(Dialect):
    """
    Errors on the console's pages: a page that says what went wrong, and,
    for a visitor who is not (or no longer) signed in, the way to the
    sign-in form.
    """

    content_type = HTML

    def status_and_body(self, error: OProxyError) -> tuple[int, bytes]:
        return error.status, _plain_page(error.message)

    def stream_event(self, error: OProxyError) -> bytes:
        return _plain_page(error.message)

    def respond(self, request: IRequest, error: OProxyError) -> bytes:
        if isinstance(error, Unauthorized):
            clear_session_cookie(request)
            target = "/ui/login"
            here = request.uri.decode("latin-1")
            if here.startswith("/ui/") and here not in ("/ui/", "/ui/login"):
                target += "?next=" + quote(here, safe="/")
            if error.code != "console_session_required":
                target += ("&" if "?" in target else "?") + "ended=1"
            request.setResponseCode(303)
            request.setHeader(b"location", target.encode("ascii"))
            request.setHeader(b"content-type", HTML)
            return b""
        return super().respond(request, error)


PAGES = PageDialect()


def _plain_page(message: str) -> bytes:
    """An error page, whole and without templates (nothing left to fail)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<title>oproxy console</title><link rel="icon" href="data:,"></head>'
        f"<body><main><h1>Console</h1><p>{escape(message)}</p>"
        '<p><a href="/ui/">Back to the console</a></p></main></body></html>'
    ).encode()


def html(scope: Scope, body: bytes, status: int = 200) -> bytes:
    scope.request.setResponseCode(status)
    scope.request.setHeader(b"content-type", HTML)
    return body


async def page(
    scope: Scope, name: str, title: str, content: Content, section: str | None = None
) -> bytes:
    """One of the pages behind the navigation, for the signed-in caller."""
    session = session_of(scope.request)
    console = console_of(scope.services)
    csrf = console.sessions.csrf_token(session) if session is not None else ""
    who = scope.caller.name if scope.caller is not None else None
    layout = Layout(name, title, content, who, csrf, section=section)
    return html(scope, await render(layout))


# -- sign-in and sign-out -----------------------------------------------------------


async def login_form(scope: Scope) -> bytes | None:
    """``GET /ui/login``: the sign-in form."""
    console_of(scope.services)
    args = scope.request.args or {}
    ended = b"ended" in args
    next_page = _next_page(args.get(b"next", [b""])[0].decode("utf-8", "replace"))
    notice = "Your session has ended. Sign in again." if ended else None
    return await _login_page(scope, next_page=next_page, notice=notice)


async def _login_page(
    scope: Scope,
    *,
    next_page: str = "/ui/",
    error: str | None = None,
    notice: str | None = None,
    status: int = 200,
) -> bytes:
    content = LoginContent(
        "login",
        {
            "next": next_page,
            "error": error,
            "notice": notice,
            "no_admin_key": not await _admin_key_exists(scope),
        },
    )
    body = await render(Layout("login", "Sign in", content, None, ""))
    return html(scope, body, status)


async def _admin_key_exists(scope: Scope) -> bool:
    """Whether any key may open the console, to tell a first visitor how to make one."""
    if any(key.policy.admin for key in scope.config.auth.keys):
        return True
    try:
        records = await scope.services.guard.store.list_keys()
    except Exception:
        return True  # the store cannot say: do not claim there is none
    for record in records:
        if record.revoked is not None:
            continue
        try:
            if policy_from_json(record.policy).admin:
                return True
        except PolicyError:
            continue
    return False


async def login(scope: Scope) -> bytes | None:
    """
    ``POST /ui/login``: a key typed into the form.  Attempts are counted per
    client address; an ordinary key, a wrong one, or one that is revoked or
    expired is refused with the form again, and no cookie.
    """
    console = console_of(scope.services)
    request = scope.request
    fields = read_form(request)
    next_page = _next_page(fields.get("next", ""))
    address = client_address(request)
    try:
        check_same_origin(request)
        await count_attempt(scope.services, address)
        token = fields.get("key", "")
        if not token.strip():
            raise Unauthorized("Type an admin key to sign in.")
        caller, fingerprint = await sign_in(scope.services, token, address)
    except OProxyError as e:
        message = e.message
        if isinstance(e, Unauthorized):
            message = f"{e.message} This key cannot open the console."
            if e.message.startswith("Type"):
                message = e.message
        scope.request.setHeader(b"cache-control", b"no-store")
        return await _login_page(scope, next_page=next_page, error=message, status=e.status)
    ttl = scope.config.console.session_ttl
    value, _ = console.sessions.issue(caller.subject, caller.name or "", fingerprint, ttl)
    set_session_cookie(request, value, ttl)
    log.info("Console sign-in by key {name}", name=caller.name)
    request.setResponseCode(303)
    request.setHeader(b"location", next_page.encode("utf-8"))
    return html(scope, b"", 303)


def _next_page(given: str) -> str:
    """Where to go after signing in: a console page, never another site."""
    if given.startswith("/ui/") and not given.startswith("/ui//") and "\\" not in given:
        return given
    return "/ui/"


async def logout(scope: Scope) -> bytes | None:
    """``POST /ui/logout``: the cookie is dropped, and the form shown again."""
    clear_session_cookie(scope.request)
    scope.request.setHeader(b"location", b"/ui/login")
    return html(scope, b"", 303)


# -- the pages ------------------------------------------------------------------------


async def dashboard(scope: Scope) -> bytes | None:
    return await page(scope, "dashboard", "Dashboard", Content("dashboard"))


async def models(scope: Scope) -> bytes | None:
    return await page(scope, "models", "Models", Content("models"))


async def keys(scope: Scope) -> bytes | None:
    return await page(scope, "keys", "Keys", Content("keys"))


async def requests(scope: Scope) -> bytes | None:
    return await page(scope, "requests", "Requests", Content("requests"))


async def configuration(scope: Scope) -> bytes | None:
    """The file in a text area, its secrets masked; read-only with a note when it must be."""
    console = console_of(scope.services)
    try:
        version: Version = await console.in_thread(read_version, console.config_path)
    except OSError as e:
        version = Version(console.config_path, "", "", False, f"The file cannot be read: {e}")
    slots = {
        "path": version.path or "(embedded defaults)",
        # A text area drops one newline right after its opening tag.
        "text": "\n" + version.text,
        "digest": version.digest,
        "writable": "true" if version.writable else "false",
        "note_text": version.note,
    }
    return await page(scope, "configuration", "Configuration", Content("configuration", slots))


async def request_record(scope: Scope) -> bytes | None:
    """``/ui/requests/<request_id>``: one recent request's access log record."""
    record = await find_record(scope)
    fields = {k: v for k, v in record.items() if k not in ("request_body", "response_body")}
    bodies: list[tuple[str, Any]] = []
    if "request_body" in record or "response_body" in record:
        bodies = [
            ("Request body", record.get("request_body")),
            ("Response body", record.get("response_body")),
        ]
    content = Content(
        "request",
        {"request_id": scope.params["request_id"], "fields": fields, "bodies": bodies},
    )
    return await page(scope, "request", "Request", content, section="requests")


async def find_record(scope: Scope) -> dict[str, Any]:
    """
    A recent request's record, from the access log.

    :raises NotFound: no access log, or no such request among the recent ones.
    """
    console = console_of(scope.services)
    if console.follower is None:
        raise NotFound("There is no JSON access log: configure access_log to keep records.")
    tally = await console.follower.fresh()
    record = tally.find(scope.params["request_id"])
    if record is None:
        raise NotFound(
            f"No request {scope.params['request_id']!r} among the recent ones in the access log."
        )
    return record
