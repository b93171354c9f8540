"""
What a setting may be.

Each conversion here takes one value from the YAML tree and returns what the
code reads (seconds as a float, a size in bytes, a canonical network), or
raises :class:`ConfigError` with a sentence that says what was expected.  A
conversion knows nothing of where its value sits: the error's key is empty,
or the part below the value (``[2]``); :mod:`oproxy.config.reading` puts the
path in front on the way up, so one conversion serves every key that uses it.

The ``Annotated`` names at the bottom (``Seconds``, ``ByteSize``...) are how
the schema says which conversion a field takes.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import attrs

from oproxy.resp import RedisAddress
from oproxy.security.keys import hash_key
from oproxy.security.policy import (
    LIMIT_NAMES,
    MODEL_LIMIT_NAMES,
    Limits,
    Network,
    PolicyError,
    limits_from_json,
)

MIB = 1024 * 1024

T = TypeVar("T")


class ConfigError(Exception):
    """
    The configuration is not valid; ``str()`` names the key and the problem.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem
        self._path: tuple[str | int, ...] = (key,) if key else ()

    def within(self, where: str | int) -> ConfigError:
        """
        The same problem seen from one level up, where the value sat under
        the key (or at the list index) ``where``.
        """
        path = (where, *self._path)
        key = ""
        for part in path:
            key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
        error = ConfigError(key, self.problem)
        error._path = path
        return error


def invalid(problem: str) -> ConfigError:
    """An error about the value itself, to be placed by the caller."""
    return ConfigError("", problem)


@attrs.frozen
class FileKey:
    """
    Where a field is written in the file, when that is not its name: a key
    in the same section (``bearer_token``), one in a subsection
    (``circuit_breaker.failures``), or ``None`` for a field the file sets
    elsewhere (``routing.models`` comes from the top-level ``models``).
    """

    key: str | None


def kind_of(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(f"must be a non-empty string, not {kind_of(value)}")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"must be true or false, not {kind_of(value)}")
    return value


def _at_least(value: Any, least: int) -> bool:
    # YAML's true and false are ints to Python; as numbers they are mistakes.
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise invalid(f"must be a positive number of seconds, not {value!r}")
    return float(value)


def count(value: Any) -> int:
    if not _at_least(value, 1):
        raise invalid(f"must be a positive whole number, not {value!r}")
    return int(value)


def whole_number(value: Any) -> int:
    if not _at_least(value, 0):
        raise invalid(f"must be a whole number, zero or more, not {value!r}")
    return int(value)


_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def byte_size(value: Any) -> int:
    """
    Accept ``1048576``, ``"512KiB"``, ``"32MiB"`` or ``"1GB"`` (binary units).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise invalid(f"must be a positive size such as 32MiB, not {value!r}")
    unit = (match.group(2) or "B")[0].upper()
    size = int(match.group(1)) * {"B": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[unit]
    if size <= 0:
        raise invalid("must be larger than zero")
    return size


def items(value: Any, convert: Callable[[Any], T]) -> tuple[T, ...]:
    """A YAML list, each item converted; an error names the item's index."""
    if not isinstance(value, list):
        raise invalid(f"must be a list, not {kind_of(value)}")
    converted = []
    for index, item in enumerate(value):
        try:
            converted.append(convert(item))
        except ConfigError as e:
            raise e.within(index) from None
    return tuple(converted)


def mapping(value: Any) -> dict[str, Any]:
    """A YAML mapping, its keys as strings (YAML also has numbers and dates)."""
    if not isinstance(value, dict):
        raise invalid(f"must be a mapping, not {kind_of(value)}")
    return {str(k): v for k, v in value.items()}


def one_of(*choices: str) -> Callable[[Any], str]:
    def choice(value: Any) -> str:
        if value not in choices:
            raise invalid(f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    return choice


def workers(value: Any) -> int | None:
    """A number of processes, or ``auto`` (``None``): one per CPU."""
    if value == "auto":
        return None
    if not _at_least(value, 1):
        raise invalid(f"must be a positive number of processes or auto, not {value!r}")
    return int(value)


def endpoints(value: Any) -> tuple[str, ...]:
    """Twisted endpoint strings: one, or a list of at least one."""
    listed = items([value] if isinstance(value, str) else value, string)
    if not listed:
        raise invalid("must name at least one endpoint")
    return listed


def network(value: Any) -> Network:
    try:
        return ipaddress.ip_network(string(value).strip(), strict=False)
    except ValueError:
        raise invalid(f"must be a network in CIDR notation, not {value!r}") from None


def cidr(value: Any) -> str:
    """A network in its canonical form, so checks compare like with like."""
    return str(network(value))


_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


def host_pattern(value: Any) -> str:
    """
    A host name (``*.`` for any subdomain) or a network in CIDR notation.

    Names are kept lower-case, networks in their canonical form, so the
    check at fetch time compares like with like.
    """
    text = string(value).strip().lower()
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        pass
    if not _HOST_NAME.match(text) or len(text) > 253:
        raise invalid(f"must be a host name or a network (CIDR), not {value!r}")
    return text


def ollama_url(value: Any) -> str:
    """
    Accept the forms ``OLLAMA_HOST`` takes (``host``, ``host:port``, a URL).

    ``0.0.0.0`` is where Ollama *listens*; the address to *call* it on is
    loopback.
    """
    given = string(value)
    text = given.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(f"must be an http(s) URL, not {given!r}")
    host = parts.hostname
    if host in ("0.0.0.0", "::"):  # noqa: S104 - translating a listen address
        host = "127.0.0.1"
    default_port = 443 if parts.scheme == "https" else 80
    port = parts.port or (11434 if "://" not in given else default_port)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def api_url(value: Any) -> str:
    """An OpenAI-compatible server's base URL, as an SDK's ``base_url`` takes it."""
    text = string(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(f"must be an http(s) URL, not {text!r}")
    if parts.username or parts.password:
        raise invalid("must not hold credentials; put the key in api_key")
    if parts.query or parts.fragment:
        raise invalid("must not have a query or fragment")
    return text.rstrip("/")


def server_url(value: Any, default_port: int) -> str:
    """
    A model server's URL, as an SDK's ``base_url`` takes it, or the
    shorter forms people write for a server on their network: ``host``
    and ``host:port`` (plain HTTP, the server's usual port).
    """
    given = string(value)
    text = given.strip()
    if "://" not in text:
        parts = urlsplit("http://" + text)
        if not parts.hostname:
            raise invalid(f"must be an http(s) URL, not {given!r}")
        try:
            port = parts.port or default_port
        except ValueError:
            raise invalid(f"must be an http(s) URL, not {given!r}") from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        text = f"http://{host}:{port}{parts.path}"
    try:
        urlsplit(text).port  # noqa: B018 - a port out of range raises
    except ValueError:
        raise invalid(f"must be an http(s) URL, not {given!r}") from None
    return api_url(text)


REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url(value: Any) -> str:
    """
    ``redis://``, ``rediss://`` (over TLS) or ``unix://`` (a socket), with
    redis-py's query options (``ssl_ca_certs``, ``ssl_cert_reqs``, ...),
    read here by the client itself so a bad option stops a load or reload.
    """
    text = string(value)
    if urlsplit(text).scheme not in REDIS_SCHEMES:
        raise invalid(f"must be a redis://, rediss:// or unix:// URL, not {text!r}")
    try:
        RedisAddress.from_url(text)
    except ValueError as e:
        raise invalid(str(e)) from None
    return text


def sentry_dsn(value: Any) -> str:
    text = string(value)
    if urlsplit(text).scheme not in ("http", "https"):
        raise invalid("must be an http(s) Sentry DSN")
    return text


def sha256_hex(value: Any) -> bytes:
    """A key given as its digest (``printf %s "$KEY" | sha256sum``)."""
    try:
        raw = bytes.fromhex(string(value))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise invalid("must be 64 hexadecimal digits")
    return raw


def digest_of(value: Any) -> bytes:
    """A secret, kept only as its SHA-256 from the moment it is read."""
    return hash_key(string(value))


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


def expiry(value: Any) -> float:
    try:
        return parse_expiry(value)
    except ValueError:
        raise invalid(f"must be a date or time such as 2027-01-31, not {value!r}") from None


def options(value: Any) -> tuple[tuple[str, Any], ...]:
    """Request defaults, kept as given: they are checked with the request."""
    return tuple(mapping(value).items())


def limits(value: Any, allowed: tuple[str, ...] = LIMIT_NAMES) -> Limits:
    try:
        return limits_from_json(value, allowed)
    except PolicyError as e:
        raise invalid(str(e)) from None


def model_limits(value: Any) -> tuple[tuple[str, Limits], ...]:
    if not isinstance(value, dict):
        raise invalid("must map model name patterns to {rpm, tpm}")
    by_pattern = []
    for pattern, given in mapping(value).items():
        try:
            by_pattern.append((pattern, limits(given, MODEL_LIMIT_NAMES)))
        except ConfigError as e:
            raise e.within(pattern) from None
    return tuple(by_pattern)


#: JSON keys an access log never shows, whatever the file adds.
ALWAYS_REDACTED = ("api_key", "authorization", "key", "password", "secret", "token")


def also_redacted(value: Any) -> tuple[str, ...]:
    return ALWAYS_REDACTED + items(value, string)


Seconds = Annotated[float, seconds]
Count = Annotated[int, count]
WholeNumber = Annotated[int, whole_number]
ByteSize = Annotated[int, byte_size]
Workers = Annotated[int | None, workers]
Endpoints = Annotated[tuple[str, ...], endpoints]
CIDR = Annotated[str, cidr]
IPNetwork = Annotated[Network, network]
HostPattern = Annotated[str, host_pattern]
RedisURL = Annotated[str, redis_url]
SentryDSN = Annotated[str, sentry_dsn]
SHA256 = Annotated[bytes, sha256_hex]
Secret = Annotated[bytes, digest_of]
Expiry = Annotated[float, expiry]
Options = Annotated[tuple[tuple[str, Any], ...], options]
ModelLimits = Annotated[tuple[tuple[str, Limits], ...], model_limits]
Redactions = Annotated[tuple[str, ...], also_redacted]
