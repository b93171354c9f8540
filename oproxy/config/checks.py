"""
What a schema cannot say: settings that must agree with each other, and
the refusal to serve the network with no keys.

Each check takes a whole :class:`~oproxy.config.schema.Config` and raises
:class:`~oproxy.config.values.ConfigError` naming the key at fault.
"""

from __future__ import annotations

import ipaddress
import re
from fnmatch import fnmatchcase

from oproxy.config.certificates import check_certificates
from oproxy.config.schema import Config, ModelRule
from oproxy.config.values import ConfigError


def check_references(config: Config) -> None:
    """
    Names used twice, rules that name no backend or fall back on
    themselves, a Redis store with no address.
    """
    if not config.backends:
        raise ConfigError("backends", "must list at least one backend")
    _unique("backends", "backend", [b.name for b in config.backends])
    names = tuple(b.name for b in config.backends)
    for rule in config.routing.models:
        _check_rule(rule, names)
    _unique("auth.keys", "key", [k.name for k in config.auth.keys])
    check_certificates(config.certificates, config.listen)
    if config.state.backend == "redis" and not config.state.url:
        raise ConfigError(
            "state.url", "a redis state store needs a redis://, rediss:// or unix:// URL"
        )


def _unique(key: str, what: str, names: list[str]) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(key, f"{what} name {twice[0]!r} is used twice")


def _check_rule(rule: ModelRule, backend_names: tuple[str, ...]) -> None:
    where = f"models.{rule.pattern}"
    for index, wanted in enumerate(rule.backends):
        if not any(fnmatchcase(name, wanted) for name in backend_names):
            raise ConfigError(f"{where}.backends[{index}]", f"names no backend ({wanted!r})")
    if rule.pattern in rule.fallbacks:
        raise ConfigError(f"{where}.fallbacks", "lists the model itself")


def endpoint_is_loopback(description: str) -> bool:
    """
    Whether a server endpoint string only accepts connections from this host.

    Unix sockets are local.  TCP-based endpoints are local only when their
    ``interface`` is a loopback address; Twisted's defaults listen on every
    interface.  Anything we cannot reason about (``systemd:``) counts as
    exposed, so the safe choice is the default.
    """
    kind, _, rest = description.partition(":")
    kind = kind.lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl", "tls"):
        return False
    interface = ""
    for part in re.split(r"(?<!\\):", rest):
        name, equals, value = part.partition("=")
        if equals and name == "interface":
            interface = value.replace("\\:", ":")
    if interface in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def check_exposure(config: Config) -> Config:
    """
    Refuse to serve beyond loopback with no keys unless that was said out loud.

    Tens of thousands of model servers sit open on the internet because the
    default was open; ours is closed.
    """
    # An endpoint that only redirects to HTTPS (and answers ACME's
    # challenges) serves nothing a key would protect.
    redirects = config.certificates.plain_http
    exposed = [e for e in config.listen if not endpoint_is_loopback(e) and e not in redirects]
    auth = config.auth
    if exposed and not auth.keys and not auth.require_keys and not auth.anonymous:
        raise ConfigError(
            "auth",
            f"listening on {exposed[0]!r} (beyond loopback) with no API keys; "
            "add auth.keys, set auth.require_keys: true (keys made with "
            "'oproxy keys create'), or set auth.anonymous: true to allow anyone "
            "who can connect",
        )
    return config
