"""
Load, interpolate and validate the configuration into a frozen snapshot.

A :class:`Config` is immutable: a reload builds a new one and swaps a single
reference, so a request keeps the snapshot it started with.  Validation is
strict (unknown keys are errors, because a typo that is silently ignored is
a security hole in a gateway) and every error names the key at fault.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
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


@dataclass(frozen=True)
class Timeouts:
    """
    How long to wait for an upstream, in seconds, at each stage.

    They are separate because they guard different failures: a dead host
    (connect), a model that is loading or stuck (first byte), and a
    generation that stalls half-way (between chunks).
    """

    connect: float = 10.0
    first_byte: float = 600.0
    between_chunks: float = 300.0


@dataclass(frozen=True)
class BackendConfig:
    """One upstream model server."""

    name: str
    type: str
    url: str
    host_header: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True)
class APIKey:
    """
    A key allowed to call the proxy, kept only as the SHA-256 of its secret.
    """

    name: str
    sha256: bytes


@dataclass(frozen=True)
class AuthConfig:
    """Who may call: listed keys, and whether anonymous callers are allowed."""

    keys: tuple[APIKey, ...] = ()
    anonymous: bool = False


@dataclass(frozen=True)
class ImagesConfig:
    """
    Fetching of ``http(s)`` image URLs on the client's behalf.

    Private and loopback addresses are refused by default: a gateway that
    fetches any URL it is given can be turned against the network it sits in.
    """

    fetch_remote: bool = True
    max_bytes: int = 20 * MIB
    timeout: float = 15.0
    allow_private_networks: bool = False


@dataclass(frozen=True)
class CacheConfig:
    """
    The response cache, for requests whose answer is deterministic by nature.

    :ivar backend: ``memory`` (an LRU per process, bounded in bytes) or
        ``redis`` (shared by every worker and host).
    :ivar ttl: seconds an answer stays fresh.
    :ivar share_across_keys: whether one caller may be served an answer first
        produced for another; off, so tenants never see each other's replays.
    """

    enabled: bool = True
    backend: str = "memory"
    max_bytes: int = 64 * MIB
    ttl: float = 3600.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    share_across_keys: bool = False


@dataclass(frozen=True)
class SentryConfig:
    """Where unhandled errors are reported (``SENTRY_DSN`` works too)."""

    dsn: str | None = None
    environment: str = "production"
    release: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """
    ``/metrics``: open to scrapers by default, or behind a bearer token
    (kept, like API keys, only as its SHA-256 digest).
    """

    token_sha256: bytes | None = None


@dataclass(frozen=True)
class AccessLogConfig:
    """
    The JSON-lines access log, and when it is rotated.

    :ivar max_bytes: rotate when the file is larger (``None``: never by size).
    :ivar daily: rotate when the (UTC) day changes.
    :ivar keep: how many rotated files to keep (``path.1`` is the newest).
    """

    path: str
    max_bytes: int | None = 100 * MIB
    daily: bool = False
    keep: int = 7
    #: Log request and response bodies (redacted, capped); off by default.
    bodies: bool = False
    body_max_bytes: int = 4096
    #: JSON keys whose values are replaced by ``"[redacted]"`` wherever they appear.
    redact: tuple[str, ...] = (
        "api_key",
        "authorization",
        "key",
        "password",
        "secret",
        "token",
    )


@dataclass(frozen=True)
class Config:
    """The whole validated configuration: one immutable snapshot."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    backends: tuple[BackendConfig, ...] = (
        BackendConfig(name="local", type="ollama", url=DEFAULT_OLLAMA_URL),
    )
    auth: AuthConfig = field(default_factory=AuthConfig)
    max_body_bytes: int = 32 * MIB
    timeouts: Timeouts = field(default_factory=Timeouts)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    #: Worker processes; ``None`` means one per CPU (``workers: auto``).
    workers: int | None = 1
    #: Seconds a stopping process lets in-flight requests and streams finish.
    drain_timeout: float = 30.0
    #: The JSON access log; without it, Twisted's own access lines are logged.
    access_log: AccessLogConfig | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sentry: SentryConfig = field(default_factory=SentryConfig)


_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def interpolate(text: str, environ: Mapping[str, str], key: str = "") -> str:
    """
    Replace ``${NAME}`` and ``${NAME:-default}`` with values from ``environ``.

    ``$$`` is a literal ``$``.  A reference to an unset variable without a
    default is an error rather than an empty string, so a missing secret
    stops the daemon instead of silently disabling authentication.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(key, f"environment variable {name} is not set")
            return default
        return value

    return _REFERENCE.sub(substitute, text)


def _interpolate_tree(node: Any, environ: Mapping[str, str], key: str) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ, key)
    if isinstance(node, list):
        return [_interpolate_tree(v, environ, f"{key}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, environ, _join(key, str(k))) for k, v in node.items()}
    return node


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


class _Section:
    """
    A mapping being validated, which remembers its path and which keys were used.
    """

    def __init__(self, node: Any, key: str) -> None:
        if node is None:
            node = {}
        if not isinstance(node, dict):
            raise ConfigError(key, f"must be a mapping, not {_kind(node)}")
        self.node: dict[Any, Any] = node
        self.key = key
        self.used: set[str] = set()

    def path(self, name: str) -> str:
        return _join(self.key, name)

    def get(self, name: str, default: T, convert: Callable[[Any, str], T]) -> T:
        self.used.add(name)
        if name not in self.node or self.node[name] is None:
            return default
        return convert(self.node[name], self.path(name))

    def require(self, name: str, convert: Callable[[Any, str], T]) -> T:
        self.used.add(name)
        if name not in self.node or self.node[name] is None:
            raise ConfigError(self.path(name), "is required")
        return convert(self.node[name], self.path(name))

    def section(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.node.get(name), self.path(name))

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.node if str(k) not in self.used)
        if unknown:
            raise ConfigError(self.path(unknown[0]), "is not a known setting")


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, not {_kind(value)}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {_kind(value)}")
    return value


def _positive_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(key, f"must be a positive number of seconds, not {value!r}")
    return float(value)


_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)


def _byte_size(value: Any, key: str) -> int:
    """
    Accept ``1048576``, ``"512KiB"``, ``"32MiB"`` or ``"1GB"`` (binary units).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(key, f"must be a positive size such as 32MiB, not {value!r}")
    unit = (match.group(2) or "B")[0].upper()
    size = int(match.group(1)) * {"B": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[unit]
    if size <= 0:
        raise ConfigError(key, "must be larger than zero")
    return size


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, not {_kind(value)}")
    return value


def normalise_ollama_url(value: str, key: str = "") -> str:
    """
    Accept the forms ``OLLAMA_HOST`` takes (``host``, ``host:port``, a URL).

    ``0.0.0.0`` is where Ollama *listens*; the address to *call* it on is
    loopback.
    """
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"must be an http(s) URL, not {value!r}")
    host = parts.hostname
    if host in ("0.0.0.0", "::"):  # noqa: S104 - translating a listen address
        host = "127.0.0.1"
    port = parts.port or (11434 if "://" not in value else (443 if parts.scheme == "https" else 80))
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _url(value: Any, key: str) -> str:
    return normalise_ollama_url(_string(value, key), key)


def _timeouts(section: _Section, default: Timeouts) -> Timeouts:
    timeouts = Timeouts(
        connect=section.get("connect", default.connect, _positive_number),
        first_byte=section.get("first_byte", default.first_byte, _positive_number),
        between_chunks=section.get("between_chunks", default.between_chunks, _positive_number),
    )
    section.done()
    return timeouts


BACKEND_TYPES = ("ollama",)


def _backends(value: Any, key: str, default_timeouts: Timeouts) -> tuple[BackendConfig, ...]:
    items = _list(value, key)
    if not items:
        raise ConfigError(key, "must list at least one backend")
    backends = []
    for index, item in enumerate(items):
        section = _Section(item, f"{key}[{index}]")
        kind = section.get("type", "ollama", _string)
        if kind not in BACKEND_TYPES:
            raise ConfigError(section.path("type"), f"must be one of {', '.join(BACKEND_TYPES)}")
        backends.append(
            BackendConfig(
                name=section.get("name", f"backend{index}", _string),
                type=kind,
                url=section.require("url", _url),
                host_header=section.get("host_header", None, _string),
                timeouts=_timeouts(section.section("timeouts"), default_timeouts),
            )
        )
        section.done()
    names = [b.name for b in backends]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(key, f"backend name {name!r} is used twice")
    return tuple(backends)


def hash_key(secret: str) -> bytes:
    """
    The SHA-256 digest under which a key is kept and compared.

    API keys are long random strings, not passwords: a fast hash is the
    right tool, and it means the plain secret is never held after loading.
    """
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _api_key(value: Any, key: str) -> APIKey:
    section = _Section(value, key)
    name = section.require("name", _string)
    plain = section.get("key", None, _string)
    digest = section.get("key_sha256", None, _string)
    section.done()
    if (plain is None) == (digest is None):
        raise ConfigError(key, "needs exactly one of key or key_sha256")
    if plain is not None:
        return APIKey(name=name, sha256=hash_key(plain))
    assert digest is not None
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(section.path("key_sha256"), "must be 64 hexadecimal digits")
    return APIKey(name=name, sha256=raw)


def _auth(section: _Section) -> AuthConfig:
    listed: list[Any] = section.get("keys", [], _list)
    keys = tuple(_api_key(item, f"{section.path('keys')}[{i}]") for i, item in enumerate(listed))
    names = [k.name for k in keys]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(section.path("keys"), f"key name {duplicates[0]!r} is used twice")
    auth = AuthConfig(keys=keys, anonymous=section.get("anonymous", False, _boolean))
    section.done()
    return auth


def _images(section: _Section) -> ImagesConfig:
    default = ImagesConfig()
    images = ImagesConfig(
        fetch_remote=section.get("fetch_remote", default.fetch_remote, _boolean),
        max_bytes=section.get("max_bytes", default.max_bytes, _byte_size),
        timeout=section.get("timeout", default.timeout, _positive_number),
        allow_private_networks=section.get(
            "allow_private_networks", default.allow_private_networks, _boolean
        ),
    )
    section.done()
    return images


def _cache(section: _Section) -> CacheConfig:
    default = CacheConfig()
    backend = section.get("backend", default.backend, _string)
    if backend not in ("memory", "redis"):
        raise ConfigError(section.path("backend"), "must be memory or redis")
    cache = CacheConfig(
        enabled=section.get("enabled", default.enabled, _boolean),
        backend=backend,
        max_bytes=section.get("max_bytes", default.max_bytes, _byte_size),
        ttl=section.get("ttl", default.ttl, _positive_number),
        redis_url=section.get("redis_url", default.redis_url, _redis_url),
        share_across_keys=section.get("share_across_keys", default.share_across_keys, _boolean),
    )
    section.done()
    return cache


def _sentry(section: _Section, environ: Mapping[str, str]) -> SentryConfig:
    config = SentryConfig(
        dsn=section.get("dsn", environ.get("SENTRY_DSN") or None, _string),
        environment=section.get(
            "environment", environ.get("SENTRY_ENVIRONMENT") or "production", _string
        ),
        release=section.get("release", None, _string),
    )
    section.done()
    if config.dsn is not None and urlsplit(config.dsn).scheme not in ("http", "https"):
        raise ConfigError(section.path("dsn"), "must be an http(s) Sentry DSN")
    return config


def _metrics(section: _Section) -> MetricsConfig:
    token = section.get("bearer_token", None, _string)
    section.done()
    return MetricsConfig(token_sha256=hash_key(token) if token is not None else None)


def _access_log(section: _Section) -> AccessLogConfig | None:
    if not section.node:
        return None
    path = section.require("path", _string)
    max_bytes = section.get("max_bytes", AccessLogConfig.max_bytes, _byte_size)
    keep = section.get("keep", AccessLogConfig.keep, _count)
    redact: list[Any] = section.get("redact", [], _list)
    config = AccessLogConfig(
        path=path,
        max_bytes=max_bytes,
        daily=section.get("daily", AccessLogConfig.daily, _boolean),
        keep=keep,
        bodies=section.get("bodies", AccessLogConfig.bodies, _boolean),
        body_max_bytes=section.get("body_max_bytes", AccessLogConfig.body_max_bytes, _byte_size),
        redact=AccessLogConfig.redact
        + tuple(_string(k, f"{section.path('redact')}[{i}]") for i, k in enumerate(redact)),
    )
    section.done()
    return config


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a positive whole number, not {value!r}")
    return value


def _redis_url(value: Any, key: str) -> str:
    text = _string(value, key)
    if urlsplit(text).scheme not in ("redis", "unix"):
        raise ConfigError(key, f"must be a redis:// or unix:// URL, not {text!r}")
    return text


def _workers(value: Any, key: str) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"must be a positive number of processes or auto, not {value!r}")
    return value


def _listen(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    items = tuple(_string(item, f"{key}[{i}]") for i, item in enumerate(_list(value, key)))
    if not items:
        raise ConfigError(key, "must name at least one endpoint")
    return items


def parse_config(data: Any, environ: Mapping[str, str]) -> Config:
    """
    Validate parsed YAML (after ``${ENV}`` interpolation) into a :class:`Config`.
    """
    root = _Section(_interpolate_tree(data, environ, ""), "")
    timeouts = _timeouts(root.section("timeouts"), Timeouts())
    default_backends = (
        BackendConfig(
            name="local",
            type="ollama",
            url=normalise_ollama_url(
                environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL, "OLLAMA_HOST"
            ),
            timeouts=timeouts,
        ),
    )
    limits = root.section("limits")
    max_body = limits.get("max_body_bytes", Config.max_body_bytes, _byte_size)
    limits.done()
    config = Config(
        listen=root.get("listen", (DEFAULT_LISTEN,), _listen),
        backends=root.get("backends", default_backends, lambda v, k: _backends(v, k, timeouts)),
        auth=_auth(root.section("auth")),
        max_body_bytes=max_body,
        timeouts=timeouts,
        images=_images(root.section("images")),
        cache=_cache(root.section("cache")),
        workers=root.get("workers", Config.workers, _workers),
        drain_timeout=root.get("drain_timeout", Config.drain_timeout, _positive_number),
        access_log=_access_log(root.section("access_log")),
        metrics=_metrics(root.section("metrics")),
        sentry=_sentry(root.section("sentry"), environ),
    )
    root.done()
    return check_exposure(config)


def load_config(text: str | None, environ: Mapping[str, str]) -> Config:
    """
    Parse a YAML document (or nothing, for the embedded defaults).
    """
    if text is None:
        return parse_config({}, environ)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError("", f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_config(data, environ)


def with_overrides(
    config: Config, *, listen: Sequence[str] = (), backend_url: str | None = None
) -> Config:
    """
    Apply the command line's ``--listen`` and ``--backend`` on top of a file.
    """
    if listen:
        config = replace(config, listen=tuple(listen))
    if backend_url is not None:
        url = normalise_ollama_url(backend_url, "--backend")
        config = replace(
            config,
            backends=(
                BackendConfig(name="local", type="ollama", url=url, timeouts=config.timeouts),
            ),
        )
    return check_exposure(config)


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
    exposed = [e for e in config.listen if not endpoint_is_loopback(e)]
    if exposed and not config.auth.keys and not config.auth.anonymous:
        raise ConfigError(
            "auth",
            f"listening on {exposed[0]!r} (beyond loopback) with no API keys; "
            "add auth.keys, or set auth.anonymous: true to allow anyone who can connect",
        )
    return config
