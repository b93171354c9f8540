"""
What a caller may do: models, networks, expiry, limits, quotas, admin.

A policy is plain data.  It comes from the config file (keys listed there,
and the limits for anonymous callers) or from the state store (keys made
with ``oproxy keys create``), where it is kept as a JSON object; the two
functions at the bottom convert, and refuse anything they do not know.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Limits:
    """
    How fast and how much.  ``None`` means no limit.

    :ivar rpm: requests per minute.
    :ivar tpm: tokens (prompt and completion) per minute.
    :ivar max_parallel: requests in flight at once.
    :ivar daily_tokens: tokens per UTC day.
    :ivar monthly_tokens: tokens per UTC calendar month.
    """

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None

    @property
    def empty(self) -> bool:
        # Spelt out: asked on every request, and dataclasses.fields() is slow.
        return (
            self.rpm is None
            and self.tpm is None
            and self.max_parallel is None
            and self.daily_tokens is None
            and self.monthly_tokens is None
        )


#: Limit names that also make sense per model (the others are per caller).
MODEL_LIMIT_NAMES = ("rpm", "tpm")
LIMIT_NAMES = tuple(f.name for f in fields(Limits))


@dataclass(frozen=True)
class KeyPolicy:
    """
    :ivar models: glob patterns of model names the key may use (empty: all).
    :ivar networks: client networks the key may be used from (empty: any).
    :ivar expires: unix time after which the key is refused (``None``: never).
    :ivar limits: limits over everything the key does.
    :ivar model_limits: ``(glob, limits)`` pairs; the first pattern matching
        a request's model adds its ``rpm`` / ``tpm`` for that key and model.
    :ivar admin: may manage keys and models.
    """

    models: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    expires: float | None = None
    limits: Limits = Limits()
    model_limits: tuple[tuple[str, Limits], ...] = ()
    admin: bool = False

    def allows_model(self, model: str) -> bool:
        return not self.models or any(fnmatchcase(model, p) for p in self.models)

    def allows_address(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # a unix socket peer has no address to match
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def limits_for_model(self, model: str) -> tuple[str, Limits] | None:
        """The first ``model_limits`` entry whose pattern matches, if any."""
        for pattern, limits in self.model_limits:
            if fnmatchcase(model, pattern):
                return pattern, limits
        return None

    @property
    def limited(self) -> bool:
        return not self.limits.empty or bool(self.model_limits)


class PolicyError(ValueError):
    """A policy field is missing, misspelt or of the wrong kind."""


def parse_network(value: str) -> Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise PolicyError(f"{value!r} is not an IP network (CIDR)") from None


def limits_from_json(data: Any, allowed: tuple[str, ...] = LIMIT_NAMES) -> Limits:
    if not isinstance(data, dict):
        raise PolicyError("limits must be a mapping")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise PolicyError(f"unknown limit {unknown[0]!r} (known: {', '.join(allowed)})")
    values: dict[str, int | None] = {}
    for name, value in data.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise PolicyError(f"limit {name!r} must be a positive integer")
        values[name] = value
    return Limits(**values)


def limits_to_json(limits: Limits) -> dict[str, int]:
    return {
        f.name: getattr(limits, f.name)
        for f in fields(limits)
        if getattr(limits, f.name) is not None
    }


def policy_to_json(policy: KeyPolicy) -> dict[str, Any]:
    """The store's form of a policy: only what differs from the default."""
    data: dict[str, Any] = {}
    if policy.models:
        data["models"] = list(policy.models)
    if policy.networks:
        data["networks"] = [str(n) for n in policy.networks]
    if policy.expires is not None:
        data["expires"] = policy.expires
    if not policy.limits.empty:
        data["limits"] = limits_to_json(policy.limits)
    if policy.model_limits:
        data["model_limits"] = {p: limits_to_json(lim) for p, lim in policy.model_limits}
    if policy.admin:
        data["admin"] = True
    return data


def policy_from_json(data: Any) -> KeyPolicy:
    """Read a stored policy back, checking it as strictly as a config file."""
    if not isinstance(data, dict):
        raise PolicyError("a key policy must be a mapping")
    known = {"models", "networks", "expires", "limits", "model_limits", "admin"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"unknown policy field {unknown[0]!r}")
    models = data.get("models", [])
    networks = data.get("networks", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise PolicyError("models must be a list of model name patterns")
    if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
        raise PolicyError("networks must be a list of CIDR strings")
    expires = data.get("expires")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
        raise PolicyError("expires must be a unix time")
    admin = data.get("admin", False)
    if not isinstance(admin, bool):
        raise PolicyError("admin must be true or false")
    per_model = data.get("model_limits", {})
    if not isinstance(per_model, dict):
        raise PolicyError("model_limits must map model patterns to limits")
    return KeyPolicy(
        models=tuple(models),
        networks=tuple(parse_network(n) for n in networks),
        expires=float(expires) if expires is not None else None,
        limits=limits_from_json(data.get("limits", {})),
        model_limits=tuple(
            (str(p), limits_from_json(lim, MODEL_LIMIT_NAMES)) for p, lim in per_model.items()
        ),
        admin=admin,
    )
