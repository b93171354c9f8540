"""
The admin console over HTTP, without a browser: who gets in, the session
cookie, CSRF, security headers, and what each page's JSON says and does.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace

import pytest_twisted
from twisted.web.test.requesthelper import DummyRequest

from oproxy.config import APIKey, AuthConfig, ConsoleConfig
from oproxy.console.access import console_of, set_session_cookie
from oproxy.console.sessions import Sessions, SessionSecret
from oproxy.security.keys import hash_key
from oproxy.security.policy import KeyPolicy, policy_from_json, policy_to_json
from oproxy.security.records import create_key, revoke_key, rotate_key
from tests.console_helpers import (
    ADMIN_KEY,
    USER_KEY,
    Console,
    console_factory,  # noqa: F401 (a fixture)
    session_cookie,
    with_config,
)

PAGES = ("/ui/", "/ui/models", "/ui/keys", "/ui/configuration", "/ui/requests")
JSON = ("/ui/api/dashboard", "/ui/api/models", "/ui/api/keys", "/ui/api/config", "/ui/api/requests")


def assert_protected(answer: object) -> None:
    """The console's security headers, on every answer."""
    header = answer.header  # type: ignore[attr-defined]
    policy = header("Content-Security-Policy")
    assert policy is not None
    for part in (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    ):
        assert part in policy
    assert "unsafe-inline" not in policy
    assert header("X-Content-Type-Options") == "nosniff"
    assert header("Referrer-Policy") == "no-referrer"


# -- who gets in ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nothing_opens_without_a_session(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    for path in PAGES:
        answer = await console.request("GET", path)
        assert answer.code == 303, path
        assert answer.header("Location").startswith("/ui/login"), path
        assert_protected(answer)
    for path in JSON:
        answer = await console.request("GET", path)
        assert answer.code == 401, path
        assert answer.json()["error"]["code"] == "console_session_required"
        assert_protected(answer)
        assert answer.header("Cache-Control") == "no-store"
    # Nor with an API key instead of a session, admin or not.
    answer = await console.request("GET", "/ui/api/keys", bearer=ADMIN_KEY)
    assert answer.code == 401


@pytest_twisted.ensureDeferred
async def test_an_admin_key_signs_in_with_a_strict_cookie(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    answer = await console.sign_in(ADMIN_KEY)
    assert answer.code == 303
    assert answer.header("Location") == "/ui/"
    cookie = next(v for v in answer.headers_named("Set-Cookie") if v.startswith("oproxy_console="))
    flags = [part.strip() for part in cookie.split(";")[1:]]
    assert "HttpOnly" in flags
    assert "SameSite=Strict" in flags
    assert "Path=/ui" in flags
    assert "Max-Age=43200" in flags
    assert "Secure" not in flags  # plain HTTP here; TLS listeners add it
    page = await console.request("GET", "/ui/")
    assert page.code == 200
    assert b"Sign out" in page.body and b"boss" in page.body
    assert page.header("Cache-Control") == "no-store"
    assert_protected(page)
    # No inline script or style anywhere on the page.
    assert b"<script>" not in page.body and b"style=" not in page.body
    for path in JSON:
        assert (await console.request("GET", path)).code == 200, path


def test_the_cookie_is_secure_over_tls() -> None:
    request = DummyRequest([b"ui"])
    request.isSecure = lambda: True  # type: ignore[method-assign]
    set_session_cookie(request, "value", 60)
    (cookie,) = request.responseHeaders.getRawHeaders(b"set-cookie")
    assert cookie.endswith(b"; Secure")


@pytest_twisted.ensureDeferred
async def test_ordinary_and_wrong_keys_are_refused(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    answer = await console.sign_in(USER_KEY)
    assert answer.code == 403
    assert b"not an admin key" in answer.body
    assert session_cookie(answer) is None
    answer = await console.sign_in("sk-oproxy-aaaaaaaaaaaa-" + "b" * 43)
    assert answer.code == 401
    assert b"Incorrect API key" in answer.body
    assert session_cookie(answer) is None
    answer = await console.sign_in("")
    assert answer.code == 401
    assert console.cookie is None


@pytest_twisted.ensureDeferred
async def test_a_stored_admin_key_signs_in(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    store = console.app.guard.store
    issued, _ = await create_key(store, "ops", KeyPolicy(admin=True), 0.0)
    answer = await console.sign_in(issued.token)
    assert answer.code == 303
    assert (await console.request("GET", "/ui/api/keys")).code == 200


@pytest_twisted.ensureDeferred
async def test_the_sign_in_page_says_how_to_make_an_admin_key(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    page = await console.request("GET", "/ui/login")
    assert b"oproxy keys create NAME --admin" not in page.body
    assert b"Admin key" in page.body and b"Sign in" in page.body
    with_config(console, auth=AuthConfig(keys=()))
    page = await console.request("GET", "/ui/login")
    assert page.code == 200
    assert b"oproxy keys create NAME --admin" in page.body
    assert_protected(page)


@pytest_twisted.ensureDeferred
async def test_sign_in_attempts_are_limited(console_factory) -> None:  # noqa: F811
    console: Console = console_factory("console:\n  login_attempts: 3\n")
    for _ in range(3):
        assert (await console.sign_in("sk-wrong-key")).code == 401
    answer = await console.sign_in(ADMIN_KEY)
    assert answer.code == 429
    assert b"Too many sign-in attempts" in answer.body
    assert session_cookie(answer) is None


@pytest_twisted.ensureDeferred
async def test_a_disabled_console_is_not_there(console_factory) -> None:  # noqa: F811
    console: Console = console_factory("console:\n  enabled: false\n")
    assert (await console.request("GET", "/ui/login")).code == 404
    assert (await console.sign_in(ADMIN_KEY)).code == 404
    assert (await console.request("GET", "/ui/api/dashboard")).code == 404


# -- CSRF and origins -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_changes_need_the_sessions_csrf_token(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    body = {"name": "csrf-test"}
    answer = await console.request("POST", "/ui/api/keys", json=body, csrf=False)
    assert answer.code == 403
    assert answer.json()["error"]["code"] == "csrf_failed"
    answer = await console.request(
        "POST", "/ui/api/keys", json=body, csrf=False, headers={"X-CSRF-Token": "forged"}
    )
    assert answer.code == 403
    # Another session's token is no good either.
    sessions = console_of(console.app.services).sessions
    other, _ = sessions.issue("cfg:boss", "boss", "x", 60)
    foreign = sessions.csrf_token(sessions.read(other))  # type: ignore[arg-type]
    answer = await console.request(
        "POST", "/ui/api/keys", json=body, csrf=False, headers={"X-CSRF-Token": foreign}
    )
    assert answer.code == 403
    assert await console.app.guard.store.list_keys() == []
    answer = await console.request("POST", "/ui/api/keys", json=body)
    assert answer.code == 201
    assert answer.json()["key"].startswith("sk-oproxy-")


@pytest_twisted.ensureDeferred
async def test_changes_from_another_site_are_refused(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    host = console.url.removeprefix("http://")
    for headers in (
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
    ):
        answer = await console.request("POST", "/ui/api/keys", json={"name": "x"}, headers=headers)
        assert answer.code == 403, headers
        assert answer.json()["error"]["code"] == "cross_site_request"
    for headers in (
        {"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
    ):
        name = f"ok-{len(headers)}-{headers['Origin'][:4]}"
        answer = await console.request("POST", "/ui/api/keys", json={"name": name}, headers=headers)
        assert answer.code == 201, headers
    # Sign-in from another site is refused too.
    answer = await console.request(
        "POST",
        "/ui/login",
        form={"key": ADMIN_KEY},
        headers={"Origin": "http://evil.example"},
        cookie="",
    )
    assert answer.code == 403
    assert session_cookie(answer) is None


@pytest_twisted.ensureDeferred
async def test_sign_out_needs_the_token_and_drops_the_cookie(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    answer = await console.request("POST", "/ui/logout", form={"csrf_token": "forged"})
    assert answer.code == 403
    answer = await console.request("POST", "/ui/logout", form={"csrf_token": console.csrf or ""})
    assert answer.code == 303
    assert answer.header("Location") == "/ui/login"
    cookie = next(v for v in answer.headers_named("Set-Cookie") if v.startswith("oproxy_console="))
    assert cookie.startswith("oproxy_console=;") and "Max-Age=0" in cookie


# -- when a session ends ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sessions_expire(console_factory) -> None:  # noqa: F811
    console: Console = console_factory("console:\n  session_ttl: 90\n")
    answer = await console.sign_in()
    cookie = next(v for v in answer.headers_named("Set-Cookie") if v.startswith("oproxy_console="))
    assert "Max-Age=90" in cookie
    sessions = console_of(console.app.services).sessions
    now = console.app.clock.seconds()
    fingerprint = sessions.read(console.cookie).fingerprint  # type: ignore[union-attr]
    old, _ = sessions.issue("cfg:boss", "boss", fingerprint, 90, now=now - 91)
    answer = await console.request("GET", "/ui/keys", cookie=old)
    assert answer.code == 303 and answer.header("Location").startswith("/ui/login")
    assert (await console.request("GET", "/ui/api/keys", cookie=old)).code == 401
    fresh, _ = sessions.issue("cfg:boss", "boss", fingerprint, 90, now=now - 89)
    assert (await console.request("GET", "/ui/api/keys", cookie=fresh)).code == 200


@pytest_twisted.ensureDeferred
async def test_a_tampered_cookie_is_nobody(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in()
    assert console.cookie is not None
    payload, _, signature = console.cookie.partition(".")
    for forged in (payload + "." + signature[::-1], payload[:-2] + "." + signature, "garbage"):
        assert (await console.request("GET", "/ui/api/keys", cookie=forged)).code == 401


@pytest_twisted.ensureDeferred
async def test_revoking_or_rotating_the_key_ends_its_sessions(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    store = console.app.guard.store
    issued, record = await create_key(store, "ops", KeyPolicy(admin=True), 0.0)
    await console.sign_in(issued.token)
    assert (await console.request("GET", "/ui/api/keys")).code == 200
    await rotate_key(store, record)
    answer = await console.request("GET", "/ui/api/keys")
    assert answer.code == 401
    assert "rotated" in answer.json()["error"]["message"]

    issued, record = await create_key(store, "ops2", KeyPolicy(admin=True), 0.0)
    await console.sign_in(issued.token)
    assert (await console.request("GET", "/ui/keys")).code == 200
    await revoke_key(store, record, 1.0)
    page = await console.request("GET", "/ui/keys")
    assert page.code == 303
    assert "ended=1" in (page.header("Location") or "")
    answer = await console.request("GET", "/ui/api/keys")
    assert answer.code == 401
    assert "revoked" in answer.json()["error"]["message"]

    # A key that is no longer admin no longer opens the console.
    issued, record = await create_key(store, "ops3", KeyPolicy(admin=True), 0.0)
    await console.sign_in(issued.token)
    demoted = replace(record, policy=policy_to_json(KeyPolicy(admin=False)))
    await store.save_key(demoted)
    assert not policy_from_json(demoted.policy).admin
    assert (await console.request("GET", "/ui/api/keys")).code == 403


@pytest_twisted.ensureDeferred
async def test_a_key_gone_from_the_file_ends_its_sessions(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    await console.sign_in(ADMIN_KEY)
    assert (await console.request("GET", "/ui/api/keys")).code == 200
    replaced = APIKey("boss", hash_key("sk-another-secret"), KeyPolicy(admin=True))
    with_config(console, auth=AuthConfig(keys=(replaced,)))
    assert (await console.request("GET", "/ui/api/keys")).code == 401


@pytest_twisted.ensureDeferred
async def test_every_worker_reads_the_same_secret(console_factory, tmp_path) -> None:  # noqa: F811
    """Sessions are signed with a secret made once in the state directory."""
    console: Console = console_factory()
    await console.sign_in()
    sessions = console_of(console.app.services).sessions
    path = sessions._secret.path  # type: ignore[attr-defined]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    another = Sessions(SessionSecret(path), console.app.clock)  # another worker
    assert another.read(console.cookie) is not None


# -- packaged files ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_static_files_are_served_from_the_package(console_factory) -> None:  # noqa: F811
    console: Console = console_factory()
    for name, kind in (
        ("console.js", "text/javascript"),
        ("charts.js", "text/javascript"),
        ("console.css", "text/css"),
    ):
        answer = await console.request("GET", f"/ui/static/{name}")
        assert answer.code == 200
        assert (answer.header("Content-Type") or "").startswith(kind)
        assert_protected(answer)
        assert len(answer.body) > 1000
    for name in ("nothing.js", "..%2Fpages.py", "../templates.py"):
        answer = await console.request("GET", f"/ui/static/{name}")
        assert answer.code == 404, name


def test_the_console_config_section() -> None:
    assert ConsoleConfig().session_ttl == 12 * 3600
