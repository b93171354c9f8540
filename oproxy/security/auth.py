"""
Checking the caller's API key.

Keys are held only as SHA-256 digests and compared in constant time, over
every configured key, so neither the comparison nor the loop leaks which
key (or how much of one) matched.
"""

from __future__ import annotations

import hmac

from oproxy.config import APIKey, hash_key
from oproxy.errors import Unauthorized

_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_BAD_KEY = "Incorrect API key provided."


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    if not authorization:
        return None
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(keys: tuple[APIKey, ...], authorization: bytes | None) -> APIKey | None:
    """
    The key the caller presented, or ``None`` when no keys are configured.

    :raises Unauthorized: keys are configured and the caller's is missing or wrong.
    """
    if not keys:
        return None
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized(_NO_KEY, code=None)
    digest = hash_key(token)
    found = None
    for key in keys:
        if hmac.compare_digest(key.sha256, digest):
            found = key
    if found is None:
        raise Unauthorized(_BAD_KEY)
    return found
