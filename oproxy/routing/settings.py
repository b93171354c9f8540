"""
The ``models:`` and ``routing:`` sections of the config file::

    models:
      gpt-4o-mini:                  # a public name (an alias) ...
        target: llama3.2:3b         # ... for the model the backends know
        backends: [gpu-*]           # backend names or globs (default: any that serves it)
        strategy: prefer-warm       # round-robin | least-busy | prefer-warm
        options: {num_ctx: 8192, temperature: 0.2, keep_alive: 10m}
        fallbacks: [qwen3:8b]       # other models to try, in order
      "qwen3:*":                    # a glob: settings for every matching name
        backends: [big-box]
    routing:
      strategy: round-robin
      retries: 2                    # extra attempts before the first byte
      circuit_breaker: {failures: 3, cooldown: 30}   # per backend, and per model on each
      discovery_interval: 30        # seconds between model list refreshes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from oproxy.validation import (
    ConfigError,
    Section,
    as_count,
    as_list,
    as_seconds,
    as_string,
)

STRATEGIES = ("round-robin", "least-busy", "prefer-warm")


@dataclass(frozen=True)
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
    strategy: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    fallbacks: tuple[str, ...] = ()

    @property
    def is_glob(self) -> bool:
        return any(c in self.pattern for c in "*?[")

    def matches(self, model: str) -> bool:
        return fnmatchcase(model, self.pattern) if self.is_glob else model == self.pattern


@dataclass(frozen=True)
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
    """

    strategy: str = "round-robin"
    retries: int = 2
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0
    discovery_interval: float = 30.0
    models: tuple[ModelRule, ...] = field(default_factory=tuple)

    def rule_for(self, model: str) -> ModelRule | None:
        """The exact rule for ``model``, else the first glob that matches it."""
        for rule in self.models:
            if not rule.is_glob and rule.pattern == model:
                return rule
        for rule in self.models:
            if rule.is_glob and rule.matches(model):
                return rule
        return None


def _strategy(value: Any, key: str) -> str:
    text = as_string(value, key)
    if text not in STRATEGIES:
        raise ConfigError(key, f"must be one of {', '.join(STRATEGIES)}")
    return text


def _retries(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"must be a whole number of retries (0 or more), not {value!r}")
    return value


def _names(section: Section, name: str) -> tuple[str, ...]:
    items: list[Any] = section.get(name, [], as_list)
    return tuple(as_string(item, f"{section.path(name)}[{i}]") for i, item in enumerate(items))


def _rule(pattern: str, value: Any, key: str, backend_names: tuple[str, ...]) -> ModelRule:
    section = Section(value, key)
    options: dict[str, Any] = section.get("options", {}, _mapping)
    rule = ModelRule(
        pattern=pattern,
        target=section.get("target", None, as_string),
        backends=_names(section, "backends"),
        strategy=section.get("strategy", None, _strategy),
        options=tuple(options.items()),
        fallbacks=_names(section, "fallbacks"),
    )
    section.done()
    for index, wanted in enumerate(rule.backends):
        if not any(fnmatchcase(name, wanted) for name in backend_names):
            raise ConfigError(
                f"{section.path('backends')}[{index}]", f"names no backend ({wanted!r})"
            )
    return rule


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a mapping")
    return {str(k): v for k, v in value.items()}


def parse_routing(
    routing: Section, models: Any, models_key: str, backend_names: tuple[str, ...]
) -> RoutingConfig:
    """Read ``routing:`` and ``models:``; check that names and fallbacks make sense."""
    breaker = routing.section("circuit_breaker")
    default = RoutingConfig()
    rules = tuple(
        _rule(str(pattern), value, f"{models_key}.{pattern}", backend_names)
        for pattern, value in _mapping(models or {}, models_key).items()
    )
    config = RoutingConfig(
        strategy=routing.get("strategy", default.strategy, _strategy),
        retries=routing.get("retries", default.retries, _retries),
        breaker_failures=breaker.get("failures", default.breaker_failures, as_count),
        breaker_cooldown=breaker.get("cooldown", default.breaker_cooldown, as_seconds),
        discovery_interval=routing.get(
            "discovery_interval", default.discovery_interval, as_seconds
        ),
        models=rules,
    )
    breaker.done()
    routing.done()
    for rule in rules:
        if rule.pattern in rule.fallbacks:
            raise ConfigError(f"{models_key}.{rule.pattern}.fallbacks", "lists the model itself")
    return config
