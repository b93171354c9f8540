"""
``/admin/keys``: key management over HTTP, for admin keys only.

The same operations as ``oproxy keys`` on the command line, on the same
store: list, create (the key is in the answer, once), show, revoke, rotate.
"""

from __future__ import annotations

from oproxy.api.scope import Scope
from oproxy.config import parse_expiry
from oproxy.errors import InvalidRequest, NotFound, PermissionDenied
from oproxy.security.keys import looks_like_key_id
from oproxy.security.policy import PolicyError, policy_from_json
from oproxy.security.records import (
    check_key_name,
    create_key,
    describe,
    revoke_key,
    rotate_key,
)
from oproxy.state.base import KeyRecord


def require_admin(scope: Scope) -> None:
    """Only an admin key may manage keys and models."""
    if scope.caller is None or not scope.caller.policy.admin:
        raise PermissionDenied("This operation needs an admin API key.", code="admin_key_required")


async def list_all(scope: Scope) -> bytes | None:
    require_admin(scope)
    now = scope.services.clock.seconds()
    records = await scope.services.guard.store.list_keys()
    return scope.json({"object": "list", "data": [describe(r, now) for r in records]})


async def create(scope: Scope) -> bytes | None:
    """
    ``POST /admin/keys`` with ``{"name": ..., "models": [...], "limits": {...}, ...}``:
    the policy fields as the store keeps them; ``expires`` may be a date.
    """
    require_admin(scope)
    body = dict(scope.body)
    try:
        name = check_key_name(body.pop("name", None))
    except ValueError as e:
        raise InvalidRequest(str(e), param="name", code="invalid_value") from None
    if isinstance(body.get("expires"), str):
        try:
            body["expires"] = parse_expiry(body["expires"])
        except ValueError:
            raise InvalidRequest("expires must be a date or time", param="expires") from None
    try:
        policy = policy_from_json(body)
    except PolicyError as e:
        raise InvalidRequest(str(e)) from None
    now = scope.services.clock.seconds()
    try:
        issued, record = await create_key(scope.services.guard.store, name, policy, now)
    except ValueError as e:
        raise InvalidRequest(str(e), param="name") from None
    # The guard asks for keys from now on (and the other processes soon).
    await scope.services.guard.refresh()
    return scope.json({**describe(record, now), "key": issued.token}, status=201)


async def show(scope: Scope) -> bytes | None:
    require_admin(scope)
    record = await _find(scope)
    return scope.json(describe(record, scope.services.clock.seconds()))


async def revoke(scope: Scope) -> bytes | None:
    require_admin(scope)
    now = scope.services.clock.seconds()
    record = await revoke_key(scope.services.guard.store, await _find(scope), now)
    return scope.json(describe(record, now))


async def rotate(scope: Scope) -> bytes | None:
    require_admin(scope)
    try:
        issued, record = await rotate_key(scope.services.guard.store, await _find(scope))
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    return scope.json({**describe(record, scope.services.clock.seconds()), "key": issued.token})


async def _find(scope: Scope) -> KeyRecord:
    """The key the path names (``/admin/keys/<key_id>``)."""
    key_id = scope.params["key_id"]
    record = await scope.services.guard.store.get_key(key_id) if looks_like_key_id(key_id) else None
    if record is None:
        raise NotFound(f"No key with the id {key_id!r}.")
    return record
