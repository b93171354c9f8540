"""
The key format: ``sk-oproxy-<public id>-<secret>``.

The public id names the key in the store, in logs and on the command line;
the secret proves possession and is never kept: the store holds its SHA-256
(keys are long random strings, not passwords, so a fast hash is right).
Both parts use only letters and digits, so the whole key survives being
pasted into shells, URLs and YAML without quoting.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from dataclasses import dataclass

PREFIX = "sk-oproxy-"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 12
#: 43 characters from 62: more than 256 bits.
SECRET_LENGTH = 43

_FORMAT = re.compile(
    rf"^{re.escape(PREFIX)}([a-z0-9]{{{ID_LENGTH}}})-([A-Za-z0-9]{{{SECRET_LENGTH}}})$"
)


@dataclass(frozen=True)
class IssuedKey:
    """A freshly made key: shown to its owner once, then only its hash is kept."""

    key_id: str
    secret: str

    @property
    def token(self) -> str:
        return f"{PREFIX}{self.key_id}-{self.secret}"

    @property
    def secret_sha256(self) -> bytes:
        return hash_key(self.secret)


def hash_key(secret: str) -> bytes:
    """
    The SHA-256 digest under which a key (or its secret) is kept and compared.

    API keys are long random strings, not passwords: a fast hash is the
    right tool, and it means the plain secret is never held after loading.
    """
    return hashlib.sha256(secret.encode("utf-8")).digest()


def new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


def new_secret() -> str:
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def issue(key_id: str | None = None) -> IssuedKey:
    """A new key; pass ``key_id`` to rotate the secret of an existing one."""
    return IssuedKey(key_id=key_id or new_key_id(), secret=new_secret())


def parse_token(token: str) -> tuple[str, str] | None:
    """``(public id, secret)`` of a token in our format, else ``None``."""
    match = _FORMAT.match(token)
    if match is None:
        return None
    return match.group(1), match.group(2)


def looks_like_key_id(text: str) -> bool:
    return len(text) == ID_LENGTH and all(c in _ID_ALPHABET for c in text)
