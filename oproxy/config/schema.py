"""
The configuration's schema: every setting once, with its type and default.

These frozen classes are both what the file is read into (by
:mod:`oproxy.config.reading`, which follows the field types) and what the
rest of the daemon reads (``config.limits.max_body_bytes``).  A field's
type says how its value is checked (``Seconds``, ``ByteSize``...: see
:mod:`oproxy.config.values`); ``FileKey`` marks the few fields written
under another key in the file.
"""

from fnmatch import fnmatchcase
from typing import Annotated

import attrs

from oproxy.config.certificates import CertificatesConfig
from oproxy.config.console import ConsoleConfig
from oproxy.config.plugins import PluginConfig
from oproxy.config.responses import ResponsesConfig
from oproxy.config.values import (
    ALWAYS_REDACTED,
    CIDR,
    MIB,
    SHA256,
    ByteSize,
    Count,
    Endpoints,
    Expiry,
    FileKey,
    HostPattern,
    IPNetwork,
    ModelLimits,
    Options,
    Redactions,
    RedisURL,
    Seconds,
    Secret,
    SentryDSN,
    WholeNumber,
    Workers,
    invalid,
    one_of,
)
from oproxy.security.policy import LIMIT_NAMES, KeyPolicy, Limits

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
BACKEND_TYPES = ("ollama", "openai", "lmstudio", "llamacpp", "vllm", "tgi", "tei", "huggingface")
#: The port each kind of server listens on unless told otherwise, for a
#: ``url`` given as a bare host.
DEFAULT_PORTS = {"lmstudio": 1234, "llamacpp": 8080, "vllm": 8000, "tgi": 3000, "tei": 3000}
#: Where ``type: huggingface`` goes when no ``url`` is given.
HUGGINGFACE_ROUTER_URL = "https://router.huggingface.co/v1"
STRATEGIES = ("round-robin", "least-busy", "prefer-warm")
#: Where ``/metrics`` may be scraped from without a token, by default.
LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

Strategy = Annotated[str, one_of(*STRATEGIES)]


@attrs.frozen
class Timeouts:
    """
    How long to wait for an upstream, in seconds, at each stage.

    They are separate because they guard different failures: a dead host
    (connect), a model that is loading or stuck (first byte), and a
    generation that stalls half-way (between chunks).
    """

    connect: Seconds = 10.0
    first_byte: Seconds = 600.0
    between_chunks: Seconds = 300.0


@attrs.frozen
class BackendConfig:
    """
    One upstream model server.

    :ivar type: ``ollama`` (its native API, translated), ``openai`` (any
        OpenAI-compatible server, passed through), or a server the proxy
        knows beyond its OpenAI routes: ``lmstudio``, ``llamacpp``,
        ``vllm``, ``tgi``, ``tei``, ``huggingface`` (see
        :mod:`oproxy.backends.kinds`).
    :ivar url: for ``ollama``, normalised from the forms ``OLLAMA_HOST``
        takes; for ``openai``, the SDK's ``base_url``; for the other kinds,
        either, or a bare ``host[:port]`` (the kind's usual port, see
        :data:`DEFAULT_PORTS`); ``huggingface`` defaults to the router.
    :ivar api_key: sent upstream as ``Authorization: Bearer`` (never shown
        in a ``repr``, so never in a log line); ``huggingface`` takes
        ``HF_TOKEN`` from the environment when it is not given.
    :ivar timeouts: the global ``timeouts``, overridden key by key.
    :ivar weight: its share of requests when several backends serve a model.
    """

    name: str
    type: Annotated[str, one_of(*BACKEND_TYPES)] = "ollama"
    url: str = attrs.field(kw_only=True)
    host_header: str | None = None
    timeouts: Timeouts = Timeouts()
    api_key: str | None = attrs.field(default=None, repr=False)
    weight: Count = 1


@attrs.frozen
class ModelRule:
    """
    How requests for a public model name (or every name matching a glob) are routed.

    :ivar target: the name the backends know the model by (``None``: the
        requested name itself).
    :ivar backends: backend names or globs allowed to serve it (empty: any).
    :ivar options: defaults merged under what the client sends.
    :ivar fallbacks: public model names tried in order when every backend of
        this one failed before answering.
    """

    pattern: str
    target: str | None = None
    backends: tuple[str, ...] = ()
    strategy: Strategy | None = None
    options: Options = ()
    fallbacks: tuple[str, ...] = ()

    @property
    def is_glob(self) -> bool:
        return any(c in self.pattern for c in "*?[")

    def matches(self, model: str) -> bool:
        return fnmatchcase(model, self.pattern) if self.is_glob else model == self.pattern


@attrs.frozen
class RoutingConfig:
    """
    :ivar retries: further attempts (other backends, then fallbacks) after a
        failure that happened before the first byte reached the client.
    :ivar breaker_failures: failures in a row that open a circuit: a
        backend's own (unreachable) or a model's on a backend (errors it
        answers for that model); see :mod:`oproxy.routing.breaker`.
    :ivar breaker_cooldown: seconds a circuit stays open before one trial
        request, and how close together failures must come to count as
        "in a row".
    :ivar discovery_interval: seconds between refreshes of each backend's models.
    :ivar models: the top-level ``models:`` mapping, one rule per key.
    """

    strategy: Strategy = "round-robin"
    retries: WholeNumber = 2
    breaker_failures: Annotated[Count, FileKey("circuit_breaker.failures")] = 3
    breaker_cooldown: Annotated[Seconds, FileKey("circuit_breaker.cooldown")] = 30.0
    discovery_interval: Seconds = 30.0
    models: Annotated[tuple[ModelRule, ...], FileKey(None)] = ()

    def rule_for(self, model: str) -> ModelRule | None:
        """The exact rule for ``model``, else the first glob that matches it."""
        for rule in self.models:
            if not rule.is_glob and rule.pattern == model:
                return rule
        for rule in self.models:
            if rule.is_glob and rule.matches(model):
                return rule
        return None


@attrs.frozen
class APIKey:
    """
    A key listed in the config file, kept only as the SHA-256 of its secret.
    """

    name: str
    sha256: bytes
    policy: KeyPolicy = attrs.Factory(KeyPolicy)


@attrs.frozen
class ListedKey:
    """
    An entry of ``auth.keys`` as the file writes it: the key (or its
    digest) and its policy, flat.  It becomes an :class:`APIKey`; the plain
    key is digested as it is read, so no object ever holds it.
    """

    name: str
    key: Secret | None = attrs.field(default=None, repr=False)
    key_sha256: SHA256 | None = None
    models: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    expires: Expiry | None = None
    rpm: Count | None = None
    tpm: Count | None = None
    max_parallel: Count | None = None
    daily_tokens: Count | None = None
    monthly_tokens: Count | None = None
    model_limits: ModelLimits = ()
    admin: bool = False

    def api_key(self) -> APIKey:
        """The key as the guard keeps it: its digest, and its policy."""
        digest = self.key or self.key_sha256
        if digest is None or None not in (self.key, self.key_sha256):
            raise invalid("needs exactly one of key or key_sha256")
        policy = KeyPolicy(
            models=self.models,
            networks=self.networks,
            expires=self.expires,
            limits=Limits(**{name: getattr(self, name) for name in LIMIT_NAMES}),
            model_limits=self.model_limits,
            admin=self.admin,
        )
        return APIKey(self.name, digest, policy)


@attrs.frozen
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
    anonymous_limits: Limits = attrs.Factory(Limits)


@attrs.frozen
class StateConfig:
    """
    Where keys, limits and quotas are kept.

    :ivar path: the SQLite database (``backend: sqlite``); the loader fills
        in the default, which depends on the environment.
    :ivar url: the Redis server (``backend: redis``).
    :ivar on_unavailable: ``closed`` refuses requests that need the store
        while it is down (503); ``open`` serves them without limits or quotas.
    :ivar timeout: seconds a store operation may take before it counts as down.
    """

    backend: Annotated[str, one_of("sqlite", "redis")] = "sqlite"
    path: str = ""
    url: RedisURL = ""
    on_unavailable: Annotated[str, one_of("closed", "open")] = "closed"
    timeout: Seconds = 2.0
    #: Redis keys start with this, so several deployments can share a server.
    namespace: str = "oproxy:"


@attrs.frozen
class RequestLimits:
    """
    What one request and one connection may cost the server.

    Each bounds a resource a single client could otherwise take from all
    the others: memory (body), backend slots (prompts, ``n``), descriptors
    (connections) and time (a request trickled in a byte at a time).
    """

    #: Larger request bodies get 413, at once when ``Content-Length`` says so.
    max_body_bytes: ByteSize = 32 * MIB
    #: Prompts in one ``/v1/completions`` list; more is a 400.
    max_prompts: Count = 64
    #: Choices (``n``) one chat or completions request may ask for.
    max_n: Count = 8
    #: Generations one request runs on the backends at a time.
    generation_concurrency: Count = 4
    #: Seconds a client has to send a request's head (line and headers) in full.
    head_timeout: Seconds = 30.0
    #: Seconds a client has to send a request's body in full, once its head is in.
    body_timeout: Seconds = 120.0
    #: Open client connections per process, and per client address.
    max_connections: Count = 4096
    max_connections_per_client: Count = 256


@attrs.frozen
class ImagesConfig:
    """
    Fetching of ``http(s)`` image URLs on the client's behalf.

    Private and loopback addresses are refused by default: a gateway that
    fetches any URL it is given can be turned against the network it sits in.
    """

    fetch_remote: bool = True
    max_bytes: ByteSize = 20 * MIB
    timeout: Seconds = 15.0
    allow_private_networks: bool = False
    #: Host names (``lan-cam.home``, ``*.images.lan``) and networks
    #: (``192.168.1.0/24``) fetched from even though they are not public:
    #: the narrow way to serve images from a LAN.
    allow_hosts: tuple[HostPattern, ...] = ()
    #: Images (inline or fetched) one request may carry; more is a 400.
    max_per_request: Count = 16
    #: Fetches one request runs at a time.
    fetch_concurrency: Count = 4
    #: Redirects followed per image, each hop checked like the first URL.
    max_redirects: WholeNumber = 3


@attrs.frozen
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
    backend: Annotated[str, one_of("memory", "redis")] = "memory"
    max_bytes: ByteSize = 64 * MIB
    ttl: Seconds = 3600.0
    redis_url: RedisURL = "redis://127.0.0.1:6379/0"
    share_across_keys: bool = False


@attrs.frozen
class SentryConfig:
    """
    Where unhandled errors are reported; ``SENTRY_DSN`` and
    ``SENTRY_ENVIRONMENT`` stand in for what the file does not say.
    """

    dsn: SentryDSN | None = None
    environment: str = "production"
    release: str | None = None


@attrs.frozen
class MetricsConfig:
    """
    ``/metrics``: open to scrapers on ``allow_networks`` (loopback by
    default); from anywhere else it needs the bearer token (kept, like API
    keys, only as its SHA-256 digest) or an admin key, because it names
    keys and their usage.  A configured token is required from everywhere,
    the allowed networks included: loopback is shared by every user of the
    host.
    """

    token_sha256: Annotated[Secret | None, FileKey("bearer_token")] = None
    allow_networks: tuple[CIDR, ...] = LOOPBACK_NETWORKS


@attrs.frozen
class AccessLogConfig:
    """
    The JSON-lines access log, and when it is rotated.

    :ivar max_bytes: rotate when the file is larger (``None``: never by size).
    :ivar daily: rotate when the (UTC) day changes.
    :ivar keep: how many rotated files to keep (``path.1`` is the newest).
    """

    path: str
    max_bytes: ByteSize | None = 100 * MIB
    daily: bool = False
    keep: Count = 7
    #: Log request and response bodies (redacted, capped); off by default.
    bodies: bool = False
    body_max_bytes: ByteSize = 4096
    #: JSON keys whose values are replaced by ``"[redacted]"`` wherever they
    #: appear: the file's names come after those always redacted.
    redact: Redactions = ALWAYS_REDACTED


@attrs.frozen
class ReloadConfig:
    """
    Whether the daemon reloads by itself when its ``--config`` file changes,
    and how often it looks (``SIGHUP`` reloads either way).
    """

    watch: bool = True
    interval: Seconds = 2.0


@attrs.frozen
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

    keepalive_after: Seconds = 2.0
    keepalive_interval: Seconds = 4.0


@attrs.frozen
class Config:
    """
    The whole validated configuration: one immutable snapshot.

    ``timeouts`` comes before ``backends`` because each backend's timeouts
    start from it: a bad global value is reported at its own key first.
    """

    listen: Endpoints = (DEFAULT_LISTEN,)
    timeouts: Timeouts = Timeouts()
    backends: tuple[BackendConfig, ...] = (
        BackendConfig(name="local", type="ollama", url=DEFAULT_OLLAMA_URL),
    )
    routing: RoutingConfig = RoutingConfig()
    auth: AuthConfig = AuthConfig()
    state: StateConfig = StateConfig()
    limits: RequestLimits = RequestLimits()
    images: ImagesConfig = ImagesConfig()
    cache: CacheConfig = CacheConfig()
    #: Worker processes; ``None`` means one per CPU (``workers: auto``).
    workers: Workers = 1
    #: Seconds a stopping process lets in-flight requests and streams finish.
    drain_timeout: Seconds = 30.0
    #: The JSON access log; without it, a combined-log-format line per request
    #: goes to the daemon's log.
    access_log: AccessLogConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    sentry: SentryConfig = SentryConfig()
    streaming: StreamingConfig = StreamingConfig()
    reload: ReloadConfig = ReloadConfig()
    responses: ResponsesConfig = attrs.field(factory=ResponsesConfig)
    #: Certificates made and renewed by the daemon (ACME, a local CA), HSTS.
    certificates: CertificatesConfig = attrs.Factory(CertificatesConfig)
    console: ConsoleConfig = attrs.Factory(ConsoleConfig)
    #: The plugins enabled, in the order they run (read by
    #: :mod:`oproxy.config.resolving`, which resolves their names).
    plugins: Annotated[tuple[PluginConfig, ...], FileKey(None)] = ()
