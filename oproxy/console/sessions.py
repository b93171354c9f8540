"""
Console sessions: a signed cookie, valid in every worker, and the CSRF
token bound to it.

Nothing is kept on the server: the cookie carries who signed in (the key's
subject and name, and a fingerprint of its secret), when, until when, and a
random session id, signed with HMAC-SHA256 under a secret every worker of
the host shares (:class:`SessionSecret`).  Any worker can check it; the
holder is checked again against the key on every request
(:mod:`oproxy.console.access`), so revoking, rotating or demoting the key
ends its sessions at once.

The CSRF token is an HMAC of the session id under the same secret: a page
of the console carries it, a page elsewhere cannot know it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from typing import Any

import orjson
from twisted.internet.interfaces import IReactorTime

#: The cookie's name.
COOKIE_NAME = b"oproxy_console"
#: Where the cookie is sent: the console's pages and JSON, nothing else.
COOKIE_PATH = b"/ui"
#: The request header (or form field) that carries the CSRF token.
CSRF_HEADER = b"x-csrf-token"
CSRF_FIELD = "csrf_token"

#: Bytes of random key material in the secret file.
SECRET_BYTES = 32
#: A session issued this far in the future (clocks of two workers) is refused.
CLOCK_SKEW = 60.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_fingerprint(secret_sha256: bytes) -> str:
    """
    What a session remembers of the key that opened it: enough to notice
    that the key was rotated (or replaced in the file), nothing that helps
    to guess it.
    """
    return hashlib.sha256(b"oproxy-console-key|" + secret_sha256).hexdigest()[:24]


class SessionSecret:
    """
    The signing secret, made once in a ``0600`` file and read by every
    worker.

    The file is written whole under a temporary name and linked into place,
    so two workers starting together agree on one secret: the second link
    fails and that worker reads the first one's.  It is read on first use
    (a few bytes, once per process).

    :param path: the file, in the state directory.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._value: bytes | None = None

    def __call__(self) -> bytes:
        if self._value is None:
            self._value = self._load()
        return self._value

    def _load(self) -> bytes:
        for _ in range(3):
            with contextlib.suppress(FileNotFoundError):
                return self._read()
            with contextlib.suppress(FileExistsError):
                self._make()
        return self._read()

    def _read(self) -> bytes:
        with open(self.path, encoding="ascii") as f:
            text = f.read().strip()
        try:
            value = binascii.unhexlify(text)
        except (binascii.Error, ValueError):
            value = b""
        if len(value) < 16:
            raise OSError(f"{self.path} does not hold a console session secret")
        return value

    def _make(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".console-signing-key-", dir=directory)
        try:
            os.write(fd, secrets.token_hex(SECRET_BYTES).encode("ascii") + b"\n")
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.chmod(temporary, 0o600)
            os.link(temporary, self.path)  # fails if another process made it first
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(temporary)


@dataclass(frozen=True)
class Session:
    """
    One sign-in.

    :ivar subject: the key's subject: ``cfg:<name>`` for a key from the
        config file, ``key:<id>`` for a stored key.
    :ivar fingerprint: :func:`key_fingerprint` of the key's secret digest.
    """

    session_id: str
    subject: str
    name: str
    fingerprint: str
    issued: float
    expires: float

    def to_json(self) -> dict[str, Any]:
        return {
            "sid": self.session_id,
            "sub": self.subject,
            "name": self.name,
            "fp": self.fingerprint,
            "iat": self.issued,
            "exp": self.expires,
        }


class Sessions:
    """
    Issue and check session cookies and their CSRF tokens.

    :param secret: the signing secret (read on first use).
    :param clock: the reactor's time.
    """

    def __init__(self, secret: SessionSecret | Any, clock: IReactorTime) -> None:
        self._secret = secret
        self._clock = clock

    def _sign(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self._secret(), purpose + b"|" + data, hashlib.sha256).digest()

    def issue(
        self, subject: str, name: str, fingerprint: str, ttl: float, *, now: float | None = None
    ) -> tuple[str, Session]:
        """A new session and its cookie value."""
        issued = self._clock.seconds() if now is None else now
        session = Session(
            session_id=secrets.token_urlsafe(16),
            subject=subject,
            name=name,
            fingerprint=fingerprint,
            issued=issued,
            expires=issued + ttl,
        )
        payload = orjson.dumps(session.to_json())
        return f"{_b64(payload)}.{_b64(self._sign(b'session', payload))}", session

    def read(self, value: bytes | str | None) -> Session | None:
        """
        The session a cookie value carries, if it is ours, intact and not
        expired; ``None`` otherwise (whatever the reason: the visitor is
        simply not signed in).
        """
        if not value:
            return None
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        payload_text, dot, signature_text = text.partition(".")
        if not dot or len(text) > 2048:
            return None
        try:
            payload = _unb64(payload_text)
            signature = _unb64(signature_text)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(signature, self._sign(b"session", payload)):
            return None
        try:
            fields = orjson.loads(payload)
            session = Session(
                session_id=str(fields["sid"]),
                subject=str(fields["sub"]),
                name=str(fields["name"]),
                fingerprint=str(fields["fp"]),
                issued=float(fields["iat"]),
                expires=float(fields["exp"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        now = self._clock.seconds()
        if now >= session.expires or session.issued > now + CLOCK_SKEW:
            return None
        return session

    def csrf_token(self, session: Session) -> str:
        """The token the session's pages send back with every change."""
        return _b64(self._sign(b"csrf", session.session_id.encode("utf-8")))

    def csrf_matches(self, session: Session, token: str | bytes | None) -> bool:
        """Whether ``token`` is the session's CSRF token (in constant time)."""
        if not token:
            return False
        given = token.encode("ascii", "replace") if isinstance(token, str) else token
        return hmac.compare_digest(given, self.csrf_token(session).encode("ascii"))
