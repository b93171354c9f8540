"""
The ``auth:`` and ``state:`` sections of the config file.

Keys listed in the file carry the same policy as keys kept in the state
store (models, networks, expiry, limits, quotas, admin), written flat::

    auth:
      keys:
        - name: alice
          key: ${ALICE_KEY}          # or key_sha256: <64 hex digits>
          models: ["llama3*"]
          rpm: 60
          tpm: 100000
          daily_tokens: 2000000
          model_limits: {"qwen*": {rpm: 10}}
      require_keys: false          # true: a key is needed even before any exists
      anonymous: false
      anonymous_limits: {rpm: 30}   # per client address, when anonymous
    state:
      backend: sqlite               # or redis, with url:
      on_unavailable: closed        # or open
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from oproxy.resp import RedisAddress
from oproxy.security.keys import hash_key as hash_key
from oproxy.security.policy import (
    LIMIT_NAMES,
    MODEL_LIMIT_NAMES,
    KeyPolicy,
    Limits,
    PolicyError,
    limits_from_json,
    parse_network,
)
from oproxy.validation import (
    ConfigError,
    Section,
    as_boolean,
    as_count,
    as_list,
    as_seconds,
    as_string,
)


@dataclass(frozen=True)
class APIKey:
    """
    A key listed in the config file, kept only as the SHA-256 of its secret.
    """

    name: str
    sha256: bytes
    policy: KeyPolicy = field(default_factory=KeyPolicy)


@dataclass(frozen=True)
class AuthConfig:
    """
    Who may call.

    :ivar require_keys: callers need a key (from this file or the state
        store) even before any key exists.
    :ivar anonymous: callers without a key are served even when keys exist
        (and even beyond loopback).
    :ivar anonymous_limits: limits for anonymous callers, per client address.
    """

    keys: tuple[APIKey, ...] = ()
    require_keys: bool = False
    anonymous: bool = False
    anonymous_limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class StateConfig:
    """
    Where keys, limits and quotas are kept.

    :ivar path: the SQLite database (``backend: sqlite``).
    :ivar url: the Redis server (``backend: redis``).
    :ivar on_unavailable: ``closed`` refuses requests that need the store
        while it is down (503); ``open`` serves them without limits or quotas.
    :ivar timeout: seconds a store operation may take before it counts as down.
    """

    backend: str = "sqlite"
    path: str = ""
    url: str = ""
    on_unavailable: str = "closed"
    timeout: float = 2.0
    #: Redis keys start with this, so several deployments can share a server.
    namespace: str = "oproxy:"


def default_state_path(environ: Mapping[str, str]) -> str:
    """
    ``state.db`` in systemd's ``$STATE_DIRECTORY``, else the XDG state directory.
    """
    directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not directory:
        base = environ.get("XDG_STATE_HOME") or os.path.join(
            environ.get("HOME") or os.path.expanduser("~"), ".local", "state"
        )
        directory = os.path.join(base, "oproxy")
    return os.path.join(directory, "state.db")


def parse_auth(section: Section) -> AuthConfig:
    listed: list[Any] = section.get("keys", [], as_list)
    keys = tuple(_api_key(item, f"{section.path('keys')}[{i}]") for i, item in enumerate(listed))
    names = [k.name for k in keys]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(section.path("keys"), f"key name {duplicates[0]!r} is used twice")
    auth = AuthConfig(
        keys=keys,
        require_keys=section.get("require_keys", False, as_boolean),
        anonymous=section.get("anonymous", False, as_boolean),
        anonymous_limits=section.get("anonymous_limits", Limits(), _limits),
    )
    section.done()
    return auth


def parse_state(section: Section, environ: Mapping[str, str]) -> StateConfig:
    default = StateConfig()
    backend = section.get("backend", default.backend, as_string)
    if backend not in ("sqlite", "redis"):
        raise ConfigError(section.path("backend"), "must be sqlite or redis")
    on_unavailable = section.get("on_unavailable", default.on_unavailable, as_string)
    if on_unavailable not in ("closed", "open"):
        raise ConfigError(section.path("on_unavailable"), "must be closed or open")
    url = section.get("url", "", as_string)
    if backend == "redis":
        if not url:
            raise ConfigError(
                section.path("url"),
                "a redis state store needs a redis://, rediss:// or unix:// URL",
            )
        try:
            RedisAddress.from_url(url)  # the scheme (rediss:// is TLS) and its options
        except ValueError as e:
            raise ConfigError(section.path("url"), str(e)) from None
    state = StateConfig(
        backend=backend,
        path=section.get("path", default_state_path(environ), as_string),
        url=url,
        on_unavailable=on_unavailable,
        timeout=section.get("timeout", default.timeout, as_seconds),
        namespace=section.get("namespace", default.namespace, as_string),
    )
    section.done()
    return state


def _api_key(value: Any, key: str) -> APIKey:
    section = Section(value, key)
    name = section.require("name", as_string)
    plain = section.get("key", None, as_string)
    digest = section.get("key_sha256", None, as_string)
    policy = KeyPolicy(
        models=tuple(
            as_string(m, f"{section.path('models')}[{i}]")
            for i, m in enumerate(_items(section, "models"))
        ),
        networks=tuple(
            _network(n, f"{section.path('networks')}[{i}]")
            for i, n in enumerate(_items(section, "networks"))
        ),
        expires=section.get("expires", None, _expiry),
        limits=Limits(**{n: section.get(n, None, as_count) for n in LIMIT_NAMES}),
        model_limits=section.get("model_limits", (), _model_limits),
        admin=section.get("admin", False, as_boolean),
    )
    section.done()
    if (plain is None) == (digest is None):
        raise ConfigError(key, "needs exactly one of key or key_sha256")
    if plain is not None:
        return APIKey(name=name, sha256=hash_key(plain), policy=policy)
    assert digest is not None
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(section.path("key_sha256"), "must be 64 hexadecimal digits")
    return APIKey(name=name, sha256=raw, policy=policy)


def _items(section: Section, name: str) -> list[Any]:
    items: list[Any] = section.get(name, [], as_list)
    return items


def _limits(value: Any, key: str, allowed: tuple[str, ...] = LIMIT_NAMES) -> Limits:
    try:
        return limits_from_json(value, allowed)
    except PolicyError as e:
        raise ConfigError(key, str(e)) from None


def _model_limits(value: Any, key: str) -> tuple[tuple[str, Limits], ...]:
    if not isinstance(value, dict):
        raise ConfigError(key, "must map model name patterns to {rpm, tpm}")
    return tuple(
        (str(pattern), _limits(limits, f"{key}.{pattern}", MODEL_LIMIT_NAMES))
        for pattern, limits in value.items()
    )


def _network(value: Any, key: str) -> Any:
    try:
        return parse_network(as_string(value, key))
    except PolicyError as e:
        raise ConfigError(key, str(e)) from None


def parse_expiry(value: Any) -> float:
    """
    A unix time from a YAML date, datetime, ISO 8601 string or number.

    Dates and times without a zone are UTC: a key's expiry must not move
    with the host's time zone.
    """
    if isinstance(value, bool):
        raise ValueError("not a time")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        value = datetime.datetime.fromisoformat(text)
    if isinstance(value, datetime.datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(
            value.year, value.month, value.day, tzinfo=datetime.UTC
        ).timestamp()
    raise ValueError("not a time")


def _expiry(value: Any, key: str) -> float:
    try:
        return parse_expiry(value)
    except ValueError:
        raise ConfigError(
            key, f"must be a date or time such as 2027-01-31, not {value!r}"
        ) from None
