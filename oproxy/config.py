"""
Load, interpolate and validate the configuration into a frozen snapshot.

A :class:`Config` is immutable: a reload builds a new one and swaps a single
reference, so a request keeps the snapshot it started with.  Validation is
strict (unknown keys are errors, because a typo that is silently ignored is
a security hole in a gateway) and every error names the key at fault.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import yaml

from oproxy.resp import RedisAddress
from oproxy.routing.settings import RoutingConfig, parse_routing
from oproxy.security.settings import (
    AuthConfig,
    StateConfig,
    hash_key,
    parse_auth,
    parse_state,
)
from oproxy.validation import (
    MIB,
    Section,
    as_boolean,
    as_byte_size,
    as_count,
    as_list,
    as_seconds,
    as_string,
    join_key,
)
from oproxy.validation import ConfigError as ConfigError

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"


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
    """
    One upstream model server.

    :ivar type: ``ollama`` (its native API, translated) or ``openai`` (any
        OpenAI-compatible server, passed through).
    :ivar api_key: sent upstream as ``Authorization: Bearer`` (never shown
        in a ``repr``, so never in a log line).
    :ivar weight: its share of requests when several backends serve a model.
    """

    name: str
    type: str
    url: str
    host_header: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    api_key: str | None = field(default=None, repr=False)
    weight: int = 1


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
    #: Host names (``lan-cam.home``, ``*.images.lan``) and networks
    #: (``192.168.1.0/24``) fetched from even though they are not public:
    #: the narrow way to serve images from a LAN.
    allow_hosts: tuple[str, ...] = ()
    #: Images (inline or fetched) one request may carry; more is a 400.
    max_per_request: int = 16
    #: Fetches one request runs at a time.
    fetch_concurrency: int = 4
    #: Redirects followed per image, each hop checked like the first URL.
    max_redirects: int = 3


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


#: Where ``/metrics`` may be scraped from without a token, by default.
LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class MetricsConfig:
    """
    ``/metrics``: open to scrapers on ``allow_networks`` (loopback by
    default); from anywhere else it needs the bearer token (kept, like API
    keys, only as its SHA-256 digest) or an admin key, because it names
    keys and their usage.  A configured token is required from everywhere,
    the allowed networks included: loopback is shared by every user of the
    host.
    """

    token_sha256: bytes | None = None
    allow_networks: tuple[str, ...] = LOOPBACK_NETWORKS


@dataclass(frozen=True)
class RequestLimits:
    """
    What one request and one connection may cost the server.

    Each bounds a resource a single client could otherwise take from all
    the others: memory (body), backend slots (prompts, ``n``), descriptors
    (connections) and time (a request trickled in a byte at a time).
    """

    #: Larger request bodies get 413, at once when ``Content-Length`` says so.
    max_body_bytes: int = 32 * MIB
    #: Prompts in one ``/v1/completions`` list; more is a 400.
    max_prompts: int = 64
    #: Choices (``n``) one chat or completions request may ask for.
    max_n: int = 8
    #: Generations one request runs on the backends at a time.
    generation_concurrency: int = 4
    #: Seconds a client has to send a request's head (line and headers) in full.
    head_timeout: float = 30.0
    #: Seconds a client has to send a request's body in full, once its head is in.
    body_timeout: float = 120.0
    #: Open client connections per process, and per client address.
    max_connections: int = 4096
    max_connections_per_client: int = 256


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
class ReloadConfig:
    """
    Whether the daemon reloads by itself when its ``--config`` file changes,
    and how often it looks (``SIGHUP`` reloads either way).
    """

    watch: bool = True
    interval: float = 2.0


@dataclass(frozen=True)
class StreamingConfig:
    """
    Keep-alives for a stream whose first chunk is slow to come (a model
    loading): after ``keepalive_after`` seconds the stream is committed and
    an SSE comment sent every ``keepalive_interval`` seconds.

    Two seconds is longer than a warm model takes to its first token, so
    only a load commits early (earlier errors stay HTTP errors), and shorter
    than any usual client read timeout; four seconds between comments stays
    under the shortest common one, httpx's default of five.
    """

    keepalive_after: float = 2.0
    keepalive_interval: float = 4.0


@dataclass(frozen=True)
class Config:
    """The whole validated configuration: one immutable snapshot."""

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    backends: tuple[BackendConfig, ...] = (
        BackendConfig(name="local", type="ollama", url=DEFAULT_OLLAMA_URL),
    )
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    #: Worker processes; ``None`` means one per CPU (``workers: auto``).
    workers: int | None = 1
    #: Seconds a stopping process lets in-flight requests and streams finish.
    drain_timeout: float = 30.0
    #: The JSON access log; without it, a combined-log-format line per request
    #: goes to the daemon's log.
    access_log: AccessLogConfig | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sentry: SentryConfig = field(default_factory=SentryConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    state: StateConfig = field(default_factory=StateConfig)
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)


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
        return {k: _interpolate_tree(v, environ, join_key(key, str(k))) for k, v in node.items()}
    return node


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
    return normalise_ollama_url(as_string(value, key), key)


def _api_url(value: Any, key: str) -> str:
    """An OpenAI-compatible server's base URL, as an SDK's ``base_url`` takes it."""
    text = as_string(value, key).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"must be an http(s) URL, not {text!r}")
    if parts.username or parts.password:
        raise ConfigError(key, "must not hold credentials; put the key in api_key")
    if parts.query or parts.fragment:
        raise ConfigError(key, "must not have a query or fragment")
    return text.rstrip("/")


def _timeouts(section: Section, default: Timeouts) -> Timeouts:
    timeouts = Timeouts(
        connect=section.get("connect", default.connect, as_seconds),
        first_byte=section.get("first_byte", default.first_byte, as_seconds),
        between_chunks=section.get("between_chunks", default.between_chunks, as_seconds),
    )
    section.done()
    return timeouts


BACKEND_TYPES = ("ollama", "openai")


def _backends(value: Any, key: str, default_timeouts: Timeouts) -> tuple[BackendConfig, ...]:
    items = as_list(value, key)
    if not items:
        raise ConfigError(key, "must list at least one backend")
    backends = []
    for index, item in enumerate(items):
        section = Section(item, f"{key}[{index}]")
        kind = section.get("type", "ollama", as_string)
        if kind not in BACKEND_TYPES:
            raise ConfigError(section.path("type"), f"must be one of {', '.join(BACKEND_TYPES)}")
        backends.append(
            BackendConfig(
                name=section.get("name", f"backend{index}", as_string),
                type=kind,
                url=section.require("url", _url if kind == "ollama" else _api_url),
                host_header=section.get("host_header", None, as_string),
                timeouts=_timeouts(section.section("timeouts"), default_timeouts),
                api_key=section.get("api_key", None, as_string),
                weight=section.get("weight", 1, as_count),
            )
        )
        section.done()
    names = [b.name for b in backends]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(key, f"backend name {name!r} is used twice")
    return tuple(backends)


def _images(section: Section) -> ImagesConfig:
    default = ImagesConfig()
    images = ImagesConfig(
        fetch_remote=section.get("fetch_remote", default.fetch_remote, as_boolean),
        max_bytes=section.get("max_bytes", default.max_bytes, as_byte_size),
        timeout=section.get("timeout", default.timeout, as_seconds),
        allow_private_networks=section.get(
            "allow_private_networks", default.allow_private_networks, as_boolean
        ),
        allow_hosts=section.get("allow_hosts", (), _host_patterns),
        max_per_request=section.get("max_per_request", default.max_per_request, as_count),
        fetch_concurrency=section.get("fetch_concurrency", default.fetch_concurrency, as_count),
        max_redirects=section.get("max_redirects", default.max_redirects, _non_negative),
    )
    section.done()
    return images


def _non_negative(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"must be a whole number, zero or more, not {value!r}")
    return value


_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


def _host_patterns(value: Any, key: str) -> tuple[str, ...]:
    """
    Host names (``*.`` for any subdomain) and networks in CIDR notation.

    Names are kept lower-case, networks in their canonical form, so the
    check at fetch time compares like with like.
    """
    patterns = []
    for index, item in enumerate(as_list(value, key)):
        where = f"{key}[{index}]"
        text = as_string(item, where).strip().lower()
        try:
            patterns.append(str(ipaddress.ip_network(text, strict=False)))
            continue
        except ValueError:
            pass
        if not _HOST_NAME.match(text) or len(text) > 253:
            raise ConfigError(where, f"must be a host name or a network (CIDR), not {item!r}")
        patterns.append(text)
    return tuple(patterns)


def _networks(value: Any, key: str) -> tuple[str, ...]:
    networks = []
    for index, item in enumerate(as_list(value, key)):
        where = f"{key}[{index}]"
        try:
            networks.append(str(ipaddress.ip_network(as_string(item, where).strip(), strict=False)))
        except ValueError:
            raise ConfigError(where, f"must be a network in CIDR notation, not {item!r}") from None
    return tuple(networks)


def _limits(section: Section) -> RequestLimits:
    default = RequestLimits()
    limits = RequestLimits(
        max_body_bytes=section.get("max_body_bytes", default.max_body_bytes, as_byte_size),
        max_prompts=section.get("max_prompts", default.max_prompts, as_count),
        max_n=section.get("max_n", default.max_n, as_count),
        generation_concurrency=section.get(
            "generation_concurrency", default.generation_concurrency, as_count
        ),
        head_timeout=section.get("head_timeout", default.head_timeout, as_seconds),
        body_timeout=section.get("body_timeout", default.body_timeout, as_seconds),
        max_connections=section.get("max_connections", default.max_connections, as_count),
        max_connections_per_client=section.get(
            "max_connections_per_client", default.max_connections_per_client, as_count
        ),
    )
    section.done()
    return limits


def _cache(section: Section) -> CacheConfig:
    default = CacheConfig()
    backend = section.get("backend", default.backend, as_string)
    if backend not in ("memory", "redis"):
        raise ConfigError(section.path("backend"), "must be memory or redis")
    cache = CacheConfig(
        enabled=section.get("enabled", default.enabled, as_boolean),
        backend=backend,
        max_bytes=section.get("max_bytes", default.max_bytes, as_byte_size),
        ttl=section.get("ttl", default.ttl, as_seconds),
        redis_url=section.get("redis_url", default.redis_url, _redis_url),
        share_across_keys=section.get("share_across_keys", default.share_across_keys, as_boolean),
    )
    section.done()
    return cache


def _sentry(section: Section, environ: Mapping[str, str]) -> SentryConfig:
    config = SentryConfig(
        dsn=section.get("dsn", environ.get("SENTRY_DSN") or None, as_string),
        environment=section.get(
            "environment", environ.get("SENTRY_ENVIRONMENT") or "production", as_string
        ),
        release=section.get("release", None, as_string),
    )
    section.done()
    if config.dsn is not None and urlsplit(config.dsn).scheme not in ("http", "https"):
        raise ConfigError(section.path("dsn"), "must be an http(s) Sentry DSN")
    return config


def _streaming(section: Section) -> StreamingConfig:
    streaming = StreamingConfig(
        keepalive_after=section.get("keepalive_after", StreamingConfig.keepalive_after, as_seconds),
        keepalive_interval=section.get(
            "keepalive_interval", StreamingConfig.keepalive_interval, as_seconds
        ),
    )
    section.done()
    return streaming


def _metrics(section: Section) -> MetricsConfig:
    token = section.get("bearer_token", None, as_string)
    networks = section.get("allow_networks", LOOPBACK_NETWORKS, _networks)
    section.done()
    return MetricsConfig(
        token_sha256=hash_key(token) if token is not None else None, allow_networks=networks
    )


def _access_log(section: Section) -> AccessLogConfig | None:
    if not section.node:
        return None
    path = section.require("path", as_string)
    max_bytes = section.get("max_bytes", AccessLogConfig.max_bytes, as_byte_size)
    keep = section.get("keep", AccessLogConfig.keep, as_count)
    redact: list[Any] = section.get("redact", [], as_list)
    config = AccessLogConfig(
        path=path,
        max_bytes=max_bytes,
        daily=section.get("daily", AccessLogConfig.daily, as_boolean),
        keep=keep,
        bodies=section.get("bodies", AccessLogConfig.bodies, as_boolean),
        body_max_bytes=section.get("body_max_bytes", AccessLogConfig.body_max_bytes, as_byte_size),
        redact=AccessLogConfig.redact
        + tuple(as_string(k, f"{section.path('redact')}[{i}]") for i, k in enumerate(redact)),
    )
    section.done()
    return config


def _reload(section: Section) -> ReloadConfig:
    config = ReloadConfig(
        watch=section.get("watch", ReloadConfig.watch, as_boolean),
        interval=section.get("interval", ReloadConfig.interval, as_seconds),
    )
    section.done()
    return config


def _redis_url(value: Any, key: str) -> str:
    text = as_string(value, key)
    try:
        RedisAddress.from_url(text)  # redis://, rediss:// (TLS) or unix://, and its options
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
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
    items = tuple(as_string(item, f"{key}[{i}]") for i, item in enumerate(as_list(value, key)))
    if not items:
        raise ConfigError(key, "must name at least one endpoint")
    return items


def parse_config(data: Any, environ: Mapping[str, str]) -> Config:
    """
    Validate parsed YAML (after ``${ENV}`` interpolation) into a :class:`Config`.
    """
    root = Section(_interpolate_tree(data, environ, ""), "")
    timeouts = _timeouts(root.section("timeouts"), Timeouts())
    default_backends: tuple[BackendConfig, ...] = (
        BackendConfig(
            name="local",
            type="ollama",
            url=normalise_ollama_url(
                environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL, "OLLAMA_HOST"
            ),
            timeouts=timeouts,
        ),
    )
    backends = root.get("backends", default_backends, lambda v, k: _backends(v, k, timeouts))
    routing = parse_routing(
        root.section("routing"),
        root.get("models", None, lambda v, k: v),
        "models",
        tuple(b.name for b in backends),
    )
    config = Config(
        listen=root.get("listen", (DEFAULT_LISTEN,), _listen),
        backends=backends,
        routing=routing,
        auth=parse_auth(root.section("auth")),
        state=parse_state(root.section("state"), environ),
        limits=_limits(root.section("limits")),
        timeouts=timeouts,
        images=_images(root.section("images")),
        cache=_cache(root.section("cache")),
        workers=root.get("workers", Config.workers, _workers),
        drain_timeout=root.get("drain_timeout", Config.drain_timeout, as_seconds),
        access_log=_access_log(root.section("access_log")),
        metrics=_metrics(root.section("metrics")),
        sentry=_sentry(root.section("sentry"), environ),
        streaming=_streaming(root.section("streaming")),
        reload=_reload(root.section("reload")),
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
