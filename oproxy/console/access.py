"""
Who may use the console: the pipeline's identification step for its
routes, sign-in, and the checks every change goes through.

The console never opens without an admin key, on loopback included.  A
key signs in once (the ``Admin key`` form); the session cookie it gets is
checked on every request against the key itself, so a key that is revoked,
rotated, expired, no longer ``admin`` or gone from the file ends its
sessions.  A request that changes something also proves it comes from a
console page: its CSRF token, and its ``Origin`` and ``Sec-Fetch-Site``
headers where the browser sends them.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from twisted.web.iweb import IRequest

from oproxy.api.scope import client_address
from oproxy.api.services import Services
from oproxy.console.parts import Console
from oproxy.console.sessions import (
    COOKIE_NAME,
    COOKIE_PATH,
    CSRF_FIELD,
    CSRF_HEADER,
    Session,
    key_fingerprint,
)
from oproxy.errors import (
    NotFound,
    PermissionDenied,
    RateLimited,
    StoreUnavailable,
    Unauthorized,
)
from oproxy.security.keys import parse_token
from oproxy.security.limits import Caller
from oproxy.security.policy import PolicyError, policy_from_json
from oproxy.state.base import RateCharge, StateUnavailable

#: Methods that change nothing: no CSRF token needed.
SAFE_METHODS = frozenset((b"GET", b"HEAD"))
#: The largest form the console reads (sign-in, sign-out).
FORM_MAX_BYTES = 16 * 1024

SIGN_IN = "Sign in to the console with an admin key."
NOT_ADMIN = "This key is not an admin key: only admin keys may open the console."


def console_of(services: Services) -> Console:
    """The console, when this process serves it and the configuration lets it."""
    console = services.console
    if console is None or not services.config.console.enabled:
        raise NotFound("The console is not enabled (console.enabled).")
    return console


def session_of(request: IRequest) -> Session | None:
    """The session the identification step found for this request."""
    found = getattr(request, "oproxy_console_session", None)
    return found if isinstance(found, Session) else None


async def console_session(services: Services, request: IRequest) -> Caller:
    """
    The pipeline's identification step for console routes: the holder of a
    valid session, whose key is still a valid admin key; for a change, one
    that came from a console page.

    :raises NotFound: the console is off.
    :raises Unauthorized: not signed in, or the session has ended.
    :raises PermissionDenied: a change without the session's CSRF token,
        or from another site.
    """
    console = console_of(services)
    session = console.sessions.read(request.getCookie(COOKIE_NAME))
    if session is None:
        raise Unauthorized(SIGN_IN, code="console_session_required")
    caller = await holder(services, session, client_address(request))
    if request.method not in SAFE_METHODS:
        check_same_origin(request)
        token = request.getHeader(CSRF_HEADER) or form_field(request, CSRF_FIELD)
        if not console.sessions.csrf_matches(session, token):
            raise PermissionDenied(
                "This change did not carry the console's CSRF token. Reload the page and "
                "try again.",
                code="csrf_failed",
            )
    request.oproxy_console_session = session  # type: ignore[attr-defined]
    return caller


async def holder(services: Services, session: Session, address: str) -> Caller:
    """
    The caller a session stands for, if its key still opens the console.

    :raises Unauthorized: the key is gone, revoked, rotated or expired.
    :raises PermissionDenied: the key lost ``admin``, or may not be used
        from ``address``.
    :raises StoreUnavailable: a stored key cannot be checked now.
    """
    kind, _, ident = session.subject.partition(":")
    ended = "Your console session has ended: "
    if kind == "cfg":
        listed = next((k for k in services.config.auth.keys if k.name == ident), None)
        if listed is None or key_fingerprint(listed.sha256) != session.fingerprint:
            raise Unauthorized(ended + "its key is no longer in the configuration.")
        policy = listed.policy
    elif kind == "key":
        try:
            record = await services.guard.store.get_key(ident)
        except StateUnavailable:
            raise StoreUnavailable(
                "The key store is unavailable, so your session cannot be checked. "
                "Please try again shortly.",
                headers={"retry-after": "1"},
            ) from None
        if record is None or record.revoked is not None:
            raise Unauthorized(ended + "its key was revoked.")
        if key_fingerprint(record.secret_sha256) != session.fingerprint:
            raise Unauthorized(ended + "its key was rotated.")
        try:
            policy = policy_from_json(record.policy)
        except PolicyError:
            raise Unauthorized(ended + "its key cannot be read.") from None
    else:
        raise Unauthorized(SIGN_IN)
    if policy.expired(services.clock.seconds()):
        raise Unauthorized(ended + "its key has expired.")
    if not policy.admin:
        raise PermissionDenied(NOT_ADMIN, code="admin_key_required")
    if not policy.allows_address(address):
        raise PermissionDenied(
            f"This key may not be used from your address ({address}).", code="ip_not_allowed"
        )
    return Caller(subject=session.subject, name=session.name, policy=policy)


async def sign_in(services: Services, token: str, address: str) -> tuple[Caller, str]:
    """
    Check a key typed into the sign-in form, as the API checks a bearer
    key, and that it is an admin key; the caller and the key's fingerprint.

    :raises Unauthorized: not a key, or a revoked or expired one.
    :raises PermissionDenied: not an admin key, or not from this address.
    :raises StoreUnavailable: stored keys cannot be checked now.
    """
    auth = services.config.auth
    caller = await services.guard.key_holder(auth, token.strip(), address)
    if not caller.policy.admin:
        raise PermissionDenied(NOT_ADMIN, code="admin_key_required")
    kind, _, ident = caller.subject.partition(":")
    if kind == "cfg":
        listed = next(k for k in auth.keys if k.name == ident)
        return caller, key_fingerprint(listed.sha256)
    parsed = parse_token(token.strip())
    record = await services.guard.store.get_key(parsed[0]) if parsed else None
    if record is None:
        raise Unauthorized("Incorrect API key provided.")
    return caller, key_fingerprint(record.secret_sha256)


async def count_attempt(services: Services, address: str) -> None:
    """
    One more sign-in attempt from ``address``, counted in the state store
    with the limiter the API's keys use, so every worker sees them all.

    :raises RateLimited: too many attempts in the last minute.
    :raises StoreUnavailable: the store is down and the proxy fails closed.
    """
    limit = services.config.console.login_attempts
    charge = RateCharge(f"console:sign-in:{address}", "requests", 1, limit)
    guard = services.guard
    try:
        admission = await guard.store.admit([charge], [], [], services.clock.seconds())
    except StateUnavailable:
        if guard.fail_open:
            return
        raise StoreUnavailable(
            "The state store is unavailable, so sign-in attempts cannot be counted. "
            "Please try again shortly.",
            headers={"retry-after": "1"},
        ) from None
    refusal = admission.refusal
    if refusal is not None:
        wait = max(1, int((refusal.retry_after or 60.0) + 0.999))
        raise RateLimited(
            f"Too many sign-in attempts from your address. Please try again in {wait}s.",
            headers={"retry-after": str(wait)},
        )


def check_same_origin(request: IRequest) -> None:
    """
    Refuse a change a page on another site asked the browser to make.

    Browsers send ``Sec-Fetch-Site`` (and ``Origin`` on every ``POST``);
    other clients may send neither, and then the CSRF token decides alone.

    :raises PermissionDenied: the request came from another origin.
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None and site.lower() not in (b"same-origin", b"none"):
        raise PermissionDenied(
            "Changes to the console must come from its own pages.", code="cross_site_request"
        )
    origin = request.getHeader(b"origin")
    if origin == b"null":
        # What a browser sends for a form posted from a page whose
        # referrer policy is no-referrer (ours): it proves nothing either
        # way, so the browser's Sec-Fetch-Site must vouch for it.
        if site is None:
            raise PermissionDenied(
                "Changes to the console must come from its own pages.", code="cross_site_request"
            )
    elif origin is not None and origin.lower() != own_origin(request).lower():
        raise PermissionDenied(
            "Changes to the console must come from its own pages.", code="cross_site_request"
        )


def own_origin(request: IRequest) -> bytes:
    """The origin the browser sees this console at (scheme and ``Host``)."""
    host = request.getHeader(b"host") or b""
    return (b"https://" if request.isSecure() else b"http://") + host


def form_field(request: IRequest, name: str) -> str | None:
    """
    A field of a URL-encoded form body (the site does not parse forms);
    the body is left to be read again.
    """
    content_type = request.getHeader(b"content-type") or b""
    if not content_type.lower().startswith(b"application/x-www-form-urlencoded"):
        return None
    fields = read_form(request)
    return fields.get(name)


def read_form(request: IRequest) -> dict[str, str]:
    """A small URL-encoded form body, its first value of each field."""
    content = request.content
    if content is None:
        return {}
    content.seek(0)
    raw = content.read(FORM_MAX_BYTES + 1)
    content.seek(0)
    if len(raw) > FORM_MAX_BYTES:
        return {}
    try:
        parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        return {}
    return {name: values[0] for name, values in parsed.items() if values}


def cookie_header(value: str, max_age: int, secure: bool) -> bytes:
    """
    The session's ``Set-Cookie`` value: HttpOnly (no script reads it),
    SameSite=Strict (no other site's page sends it), for ``/ui`` only,
    Secure when the console is served over TLS.
    """
    parts = [
        COOKIE_NAME + b"=" + value.encode("ascii"),
        b"Path=" + COOKIE_PATH,
        b"Max-Age=%d" % max_age,
        b"HttpOnly",
        b"SameSite=Strict",
    ]
    if secure:
        parts.append(b"Secure")
    return b"; ".join(parts)


def set_session_cookie(request: IRequest, value: str, ttl: float) -> None:
    request.responseHeaders.addRawHeader(
        b"set-cookie", cookie_header(value, int(ttl), request.isSecure())
    )


def clear_session_cookie(request: IRequest) -> None:
    request.responseHeaders.addRawHeader(b"set-cookie", cookie_header("", 0, request.isSecure()))
