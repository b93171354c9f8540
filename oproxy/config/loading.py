"""
From a YAML file (or none) to a :class:`~oproxy.config.schema.Config`.

The schema is read by :mod:`oproxy.config.reading`; what is here is the
policy around it, by hand: ``${ENV}`` interpolation, the defaults that come
from the environment (``OLLAMA_HOST``, ``SENTRY_DSN``, the state
directory), the backend fields that depend on each other, the command
line's overrides, and the checks of :mod:`oproxy.config.checks`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import yaml

from oproxy.config.certificates import check_certificates, with_directory
from oproxy.config.checks import check_exposure, check_references
from oproxy.config.reading import structure
from oproxy.config.resolving import Finder, read_plugins
from oproxy.config.schema import (
    DEFAULT_OLLAMA_URL,
    DEFAULT_PORTS,
    HUGGINGFACE_ROUTER_URL,
    BackendConfig,
    Config,
    ModelRule,
)
from oproxy.config.values import ConfigError, api_url, mapping, ollama_url, server_url

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


def _interpolate_tree(node: Any, environ: Mapping[str, str], key: str = "") -> Any:
    if isinstance(node, str):
        return interpolate(node, environ, key)
    if isinstance(node, list):
        return [_interpolate_tree(v, environ, f"{key}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {
            k: _interpolate_tree(v, environ, f"{key}.{k}" if key else str(k))
            for k, v in node.items()
        }
    return node


def normalise_ollama_url(value: str, key: str = "") -> str:
    """The URL to call an Ollama at, from any form ``OLLAMA_HOST`` takes."""
    try:
        return ollama_url(value)
    except ConfigError as e:
        raise ConfigError(key, e.problem) from None


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


def _fill(document: dict[str, Any], section: str, key: str, value: str | None) -> None:
    """
    Put ``value`` at ``section.key`` unless the file says something there,
    so that a default from the environment is checked like the file's own.
    """
    part = _or(document.get(section), {})
    if value and isinstance(part, dict) and part.get(key) is None:
        document[section] = {**part, key: value}


def _or(value: Any, default: Any) -> Any:
    """The value, or the default when the file left it empty (``null``)."""
    return default if value is None else value


def _fill_backends(document: dict[str, Any], environ: Mapping[str, str]) -> None:
    """
    A backend's default name is its place in the list; its timeouts are
    the global ones, overridden key by key.  A ``huggingface`` backend
    goes to the Inference Providers router unless told otherwise, with the
    token ``HF_TOKEN`` holds unless ``api_key`` gives one.
    """
    listed, shared = document.get("backends"), _or(document.get("timeouts"), {})
    if not isinstance(listed, list) or not isinstance(shared, dict):
        return
    filled = []
    for index, given in enumerate(listed):
        given = _or(given, {})
        if isinstance(given, dict):
            own = _or(given.get("timeouts"), {})
            given = {**given, "name": _or(given.get("name"), f"backend{index}")}
            if isinstance(own, dict) and shared:
                given["timeouts"] = {**shared, **{k: _or(v, shared.get(k)) for k, v in own.items()}}
            if given.get("type") == "huggingface":
                given["url"] = _or(given.get("url"), HUGGINGFACE_ROUTER_URL)
                given["api_key"] = _or(given.get("api_key"), environ.get("HF_TOKEN") or None)
        filled.append(given)
    document["backends"] = filled


def _model_rules(models: Any) -> tuple[ModelRule, ...]:
    """``models:`` maps each public name or glob to its rule."""
    rules = []
    try:
        given = mapping({} if models is None else models)
    except ConfigError as e:
        raise e.within("models") from None
    for pattern, body in given.items():
        body = _or(body, {})
        try:
            if isinstance(body, dict) and "pattern" in body:
                raise ConfigError("pattern", "is not a known setting")
            rule = {**body, "pattern": pattern} if isinstance(body, dict) else body
            rules.append(structure(rule, ModelRule))
        except ConfigError as e:
            raise e.within(pattern).within("models") from None
    return tuple(rules)


def _backend_url(backend: BackendConfig, index: int) -> BackendConfig:
    """
    An Ollama's URL as ``OLLAMA_HOST`` takes it; a generic server's as its
    SDK does; a known server's either way or as ``host[:port]``.  A
    ``huggingface`` backend needs its token.
    """
    try:
        if backend.type == "ollama":
            url = ollama_url(backend.url)
        elif backend.type in DEFAULT_PORTS:
            url = server_url(backend.url, DEFAULT_PORTS[backend.type])
        else:
            url = api_url(backend.url)
    except ConfigError as e:
        raise e.within("url").within(index).within("backends") from None
    if backend.type == "huggingface" and not backend.api_key:
        raise (
            ConfigError(
                "api_key",
                "a huggingface backend needs a Hugging Face token: set api_key, or HF_TOKEN "
                "in the environment",
            )
            .within(index)
            .within("backends")
        )
    return attrs.evolve(backend, url=url)


def parse_config(data: Any, environ: Mapping[str, str], *, plugins: Finder | None = None) -> Config:
    """
    Validate parsed YAML (after ``${ENV}`` interpolation) into a :class:`Config`.

    :param plugins: how plugin names are resolved (by default, among the
        installed plugins, searched only when the file enables some).
    """
    document = _interpolate_tree({} if data is None else data, environ)
    ollama = normalise_ollama_url(environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL, "OLLAMA_HOST")
    models = enabled = None
    if isinstance(document, dict):
        models = document.pop("models", None)
        enabled = document.pop("plugins", None)
        if document.get("access_log") == {}:
            del document["access_log"]  # every line commented out: no access log
        _fill(document, "sentry", "dsn", environ.get("SENTRY_DSN"))
        _fill(document, "sentry", "environment", environ.get("SENTRY_ENVIRONMENT"))
        _fill_backends(document, environ)
    config = structure(document, Config)
    backends: tuple[BackendConfig, ...]
    if document.get("backends") is None:
        backends = (BackendConfig(name="local", url=ollama, timeouts=config.timeouts),)
    else:
        backends = tuple(_backend_url(b, i) for i, b in enumerate(config.backends))
    state = attrs.evolve(config.state, path=config.state.path or default_state_path(environ))
    config = attrs.evolve(
        config,
        backends=backends,
        routing=attrs.evolve(config.routing, models=_model_rules(models)),
        state=state,
        certificates=with_directory(config.certificates, state.path),
        plugins=read_plugins(enabled, plugins),
    )
    check_references(config)
    return check_exposure(config)


def load_config(
    text: str | None, environ: Mapping[str, str], *, plugins: Finder | None = None
) -> Config:
    """
    Parse a YAML document (or nothing, for the embedded defaults).
    """
    if text is None:
        return parse_config({}, environ, plugins=plugins)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError("", f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_config(data, environ, plugins=plugins)


def with_overrides(
    config: Config, *, listen: Sequence[str] = (), backend_url: str | None = None
) -> Config:
    """
    Apply the command line's ``--listen`` and ``--backend`` on top of a file.
    """
    if listen:
        config = attrs.evolve(config, listen=tuple(listen))
    if backend_url is not None:
        url = normalise_ollama_url(backend_url, "--backend")
        local = BackendConfig(name="local", type="ollama", url=url, timeouts=config.timeouts)
        config = attrs.evolve(config, backends=(local,))
    check_certificates(config.certificates, config.listen)
    return check_exposure(config)
