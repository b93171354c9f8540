"""
The configuration: one YAML file, read into a frozen snapshot.

A :class:`Config` is immutable: a reload builds a new one and swaps a single
reference, so a request keeps the snapshot it started with.  Validation is
strict (unknown keys are errors, because a typo that is silently ignored is
a security hole in a gateway) and every error names the key at fault.

The rooms: :mod:`~oproxy.config.schema` (every setting once, as attrs
classes), :mod:`~oproxy.config.values` (what a value may be),
:mod:`~oproxy.config.reading` (cattrs, and errors named by their key path),
:mod:`~oproxy.config.loading` (interpolation, the environment, the command
line), :mod:`~oproxy.config.checks` (cross-references, exposure) and
:mod:`~oproxy.config.restart` (the settings a reload cannot apply).
"""

from oproxy.config.checks import check_exposure, endpoint_is_loopback
from oproxy.config.console import ConsoleConfig
from oproxy.config.loading import (
    default_state_path,
    interpolate,
    load_config,
    normalise_ollama_url,
    parse_config,
    with_overrides,
)
from oproxy.config.plugins import PluginConfig
from oproxy.config.responses import ResponsesConfig
from oproxy.config.schema import (
    DEFAULT_LISTEN,
    DEFAULT_OLLAMA_URL,
    LOOPBACK_NETWORKS,
    AccessLogConfig,
    APIKey,
    AuthConfig,
    BackendConfig,
    CacheConfig,
    Config,
    ImagesConfig,
    MetricsConfig,
    ModelRule,
    ReloadConfig,
    RequestLimits,
    RoutingConfig,
    SentryConfig,
    StateConfig,
    StreamingConfig,
    Timeouts,
)
from oproxy.config.values import ConfigError, parse_expiry

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_OLLAMA_URL",
    "LOOPBACK_NETWORKS",
    "APIKey",
    "AccessLogConfig",
    "AuthConfig",
    "BackendConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "ConsoleConfig",
    "ImagesConfig",
    "MetricsConfig",
    "ModelRule",
    "PluginConfig",
    "ReloadConfig",
    "RequestLimits",
    "ResponsesConfig",
    "RoutingConfig",
    "SentryConfig",
    "StateConfig",
    "StreamingConfig",
    "Timeouts",
    "check_exposure",
    "default_state_path",
    "endpoint_is_loopback",
    "interpolate",
    "load_config",
    "normalise_ollama_url",
    "parse_config",
    "parse_expiry",
    "with_overrides",
]
