"""
The lines that tell the person who started the daemon what serves where.

One line per listener as soon as it is bound, with the URL a client puts
in ``base_url`` (the real port when ``0`` was asked for); one line per
backend once the first probe has answered, saying whether it can be reached
and how many models it has.  With worker processes the master says the
first, and only the first worker, the first time it starts, the second:
each is said once, not once a process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger

from oproxy import __version__
from oproxy.config import BackendConfig
from oproxy.health import BackendHealth
from oproxy.routing.catalog import Catalog

log = Logger(namespace="oproxy")

API_BASE = "/v1"
DOCS_PATH = "/docs"
METRICS_PATH = "/metrics"

#: Endpoint types whose connections speak TLS.
_TLS_ENDPOINTS = frozenset({"ssl", "tls"})

_KINDS = {
    "ollama": "Ollama",
    "openai": "OpenAI-compatible server",
    "lmstudio": "LM Studio",
    "llamacpp": "llama.cpp server",
    "vllm": "vLLM",
    "tgi": "text-generation-inference",
    "tei": "text-embeddings-inference",
    "huggingface": "Hugging Face Inference Providers",
}


def bound_address(address: object) -> tuple[str, int] | str:
    """
    ``(host, port)`` of an internet socket, or the path of a Unix one, from
    a listening port's ``getHost()`` or a socket's ``getsockname()``.
    """
    if isinstance(address, IPv4Address | IPv6Address):
        return address.host, address.port
    if isinstance(address, UNIXAddress):
        address = address.name
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    if isinstance(address, bytes):
        address = address.decode("utf-8", "replace")
    path = str(address)
    # A name in the abstract namespace starts with a NUL; ss and systemd write "@".
    return "@" + path[1:] if path.startswith("\0") else path


def listener_line(description: str, address: object, workers: int = 1) -> str:
    """
    What one listener serves, e.g. ``oproxy 0.1.0 serving the OpenAI API at
    http://127.0.0.1:8000/v1 (docs /docs, metrics /metrics)``.

    :param description: the endpoint string, for the scheme (``ssl:`` and
        ``tls:`` serve HTTPS).
    :param address: where it is bound (see :func:`bound_address`).
    """
    where = bound_address(address)
    paths = f"docs {DOCS_PATH}, metrics {METRICS_PATH}"
    if isinstance(where, str):
        place = f"unix:{where} (API {API_BASE}, {paths})"
    else:
        host, port = where
        scheme = "https" if description.split(":", 1)[0].strip() in _TLS_ENDPOINTS else "http"
        if ":" in host:
            host = f"[{host}]"
        place = f"{scheme}://{host}:{port}{API_BASE} ({paths})"
    line = f"oproxy {__version__} serving the OpenAI API at {place}"
    if workers > 1:
        line += f" with {workers} worker processes"
    return line


def without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part, which must not reach a log."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def backend_line(backend: BackendConfig, health: BackendHealth | None, models: int | None) -> str:
    """
    How one backend answered the first probe, e.g. ``Backend local: Ollama
    at http://127.0.0.1:11434 (reachable, 6 models)``.

    :param models: how many models it serves, when known.
    """
    kind = _KINDS.get(backend.type, backend.type)
    if health is None:
        state = "not probed"
    elif health.reachable:
        state = "reachable"
        if models is not None:
            state += f", {models} model" + ("" if models == 1 else "s")
    elif health.answered:
        state = f"answers, but not as expected: {health.error}"
    else:
        state = f"not reachable: {health.error}"
    return f"Backend {backend.name}: {kind} at {without_credentials(backend.url)} ({state})"


def log_listeners(listeners: Iterable[tuple[str, object]], workers: int = 1) -> None:
    """A line per ``(endpoint description, bound address)``."""
    for description, address in listeners:
        log.info("{line}", line=listener_line(description, address, workers))


def log_backends(
    backends: Sequence[BackendConfig], found: Sequence[BackendHealth], catalog: Catalog
) -> None:
    """
    A line per backend, after the first probe.

    :param catalog: routing's model lists, for the count of a server whose
        probe does not list its models (an OpenAI-compatible server with
        ``/health``).
    """
    by_name = {health.name: health for health in found}
    for backend in backends:
        health = by_name.get(backend.name)
        models = health.models_available if health is not None else None
        if models is None and catalog.known(backend.name):
            models = len(catalog.models(backend.name))
        log.info("{line}", line=backend_line(backend, health, models))
