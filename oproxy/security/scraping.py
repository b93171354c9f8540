"""
Who may read ``/metrics``.

The metrics name every key and count its tokens, so they are not for
everyone.  Scrapers on ``metrics.allow_networks`` (loopback by default) and
Unix socket peers read them without a credential; from anywhere else a
caller needs the metrics bearer token or an admin key.  A configured token
is required from inside the networks too, as it always was: an operator
sets one to close the door, and loopback is shared by every local user.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress

from oproxy.config import AuthConfig, MetricsConfig
from oproxy.errors import PermissionDenied, Unauthorized
from oproxy.security.guard import Guard, bearer_token
from oproxy.security.keys import hash_key
from oproxy.security.policy import Network

NEEDS_CREDENTIAL = (
    "Metrics need a credential here: send Authorization: Bearer with the "
    "metrics token or an admin API key."
)
NOT_ADMIN = "Metrics need the metrics token or an admin API key."


async def check_scraper(
    guard: Guard,
    auth: AuthConfig,
    metrics: MetricsConfig,
    authorization: bytes | None,
    address: str,
) -> None:
    """
    Let the scrape through, or say why not.

    Inside the networks, without a configured token, nothing is checked:
    whatever ``Authorization`` a scraper sends is ignored, as the API
    ignores tokens while no key exists.

    :raises Unauthorized: no credential where one is needed, or one that is
        neither the token nor a valid key.
    :raises PermissionDenied: a key that is not an admin key, or one that
        may not be used from ``address``.
    :raises StoreUnavailable: a stored key cannot be checked.
    """
    digest = metrics.token_sha256
    if digest is None and is_local(address, metrics.allow_networks):
        return
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized(NEEDS_CREDENTIAL)
    if digest is not None and hmac.compare_digest(digest, hash_key(token)):
        return
    caller = await guard.key_holder(auth, token, address)
    if not caller.policy.admin:
        raise PermissionDenied(NOT_ADMIN, code="admin_key_required")


def is_local(address: str, networks: tuple[str, ...]) -> bool:
    """
    Whether a peer is on one of ``networks`` (CIDR strings); a Unix socket
    peer (``unix``) is always local.  An IPv4 client of a dual-stack socket
    (``::ffff:127.0.0.1``) counts by its IPv4 address.
    """
    if address == "unix":
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _parsed(networks))


@functools.lru_cache(maxsize=16)
def _parsed(networks: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)
