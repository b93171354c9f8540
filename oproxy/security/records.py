"""
Stored keys as people see them: made, described, never with their secret.

Shared by the command line and the admin API, so both say the same thing.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import replace
from typing import Any

from oproxy.security import keys
from oproxy.security.policy import KeyPolicy, policy_from_json, policy_to_json
from oproxy.state.base import IStateStore, KeyRecord

#: Longest name a new key may have.
NAME_MAX_LENGTH = 64
NAME_RULE = (
    f"1 to {NAME_MAX_LENGTH} characters: letters, digits and . _ - @ :, "
    "starting with a letter or a digit"
)
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@:-]{{0,{NAME_MAX_LENGTH - 1}}}")


def check_key_name(name: object) -> str:
    """
    ``name`` when it may name a new key, else a :class:`ValueError` saying
    what a name may be.

    A key's name shows in logs, metric labels, terminals and the admin API:
    it must read the same everywhere, so it is short and plain, without
    spaces, control characters or look-alike letters; and it starts with a
    letter or digit, so that ``oproxy keys revoke NAME`` never reads it as
    an option.  Only new names are checked: keys made before keep theirs
    (and :func:`shown_name` prints those safely).
    """
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ValueError(f"a key name must be {NAME_RULE}")
    return name


def shown_name(name: str) -> str:
    """
    A stored name fit for a terminal: as it is when it follows the rule,
    else quoted with its control characters escaped and cut short, since a
    key made before names were checked may hold anything.
    """
    if _NAME.fullmatch(name) is not None:
        return name
    if len(name) > NAME_MAX_LENGTH:
        return repr(name[:NAME_MAX_LENGTH]) + "..."
    return repr(name)


def new_key(name: str, policy: KeyPolicy, now: float) -> tuple[keys.IssuedKey, KeyRecord]:
    """A new key and the record the store keeps of it (its secret's hash only)."""
    issued = keys.issue()
    record = KeyRecord(
        key_id=issued.key_id,
        name=name,
        secret_sha256=issued.secret_sha256,
        created=now,
        policy=policy_to_json(policy),
    )
    return issued, record


async def create_key(
    store: IStateStore, name: str, policy: KeyPolicy, now: float
) -> tuple[keys.IssuedKey, KeyRecord]:
    """
    Make and store a key.

    :raises ValueError: the name does not follow :func:`check_key_name`'s
        rule, or is taken (the store also refuses it atomically, should two
        callers race).
    """
    check_key_name(name)
    if any(r.name == name for r in await store.list_keys()):
        raise ValueError(f"a key named {name!r} already exists")
    issued, record = new_key(name, policy, now)
    await store.add_key(record)
    return issued, record


async def revoke_key(store: IStateStore, record: KeyRecord, now: float) -> KeyRecord:
    """Refuse the key from now on; revoking twice keeps the first time."""
    if record.revoked is not None:
        return record
    revoked = replace(record, revoked=now)
    await store.save_key(revoked)
    return revoked


async def rotate_key(store: IStateStore, record: KeyRecord) -> tuple[keys.IssuedKey, KeyRecord]:
    """
    Give the key a new secret; the old one stops working at once.

    :raises ValueError: the key is revoked.
    """
    if record.revoked is not None:
        raise ValueError(f"key {record.key_id} is revoked; create a new one")
    issued = keys.issue(record.key_id)
    rotated = replace(record, secret_sha256=issued.secret_sha256)
    await store.save_key(rotated)
    return issued, rotated


def status(record: KeyRecord, now: float) -> str:
    if record.revoked is not None:
        return "revoked"
    return "expired" if policy_from_json(record.policy).expired(now) else "active"


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def describe(record: KeyRecord, now: float) -> dict[str, Any]:
    """A JSON-ready description: id, name, status, times, policy."""
    return {
        "id": record.key_id,
        "name": record.name,
        "status": status(record, now),
        "created": iso_time(record.created),
        "revoked": iso_time(record.revoked),
        "policy": dict(record.policy),
    }
