"""
``twistd oproxy``: the command line and the one composition root.

Only this module touches the global reactor, reads files and builds
connection pools; everything below receives what it needs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import treq
from twisted.application import service, strports
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory

from oproxy import __version__
from oproxy.app import ProxyApp
from oproxy.backends.ollama import OllamaBackend
from oproxy.config import Config, ConfigError, load_config, with_overrides
from oproxy.routing import Router
from oproxy.site import ProxySite
from oproxy.upstream import Upstream


class Options(usage.Options):
    """``twistd oproxy [--config FILE] [--listen ENDPOINT]... [--backend URL]``."""

    optParameters = [
        ["config", "c", None, "YAML configuration file (default: embedded defaults)."],
        ["backend", "b", None, "URL of an Ollama server; replaces the configured backends."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self.config: Config | None = None
        self._failed = False

    def opt_listen(self, endpoint: str) -> None:
        """A Twisted endpoint to serve on (repeatable), e.g. tcp:8000:interface=127.0.0.1."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"oproxy {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            text = None
            if self["config"]:
                with open(self["config"], encoding="utf-8") as f:
                    text = f.read()
            config = load_config(text, os.environ)
            self.config = with_overrides(config, listen=self["listen"], backend_url=self["backend"])
        except OSError as e:
            self._failed = True
            raise usage.UsageError(f"cannot read config file: {e}") from None
        except ConfigError as e:
            self._failed = True
            where = f" in {self['config']}" if self["config"] else ""
            raise usage.UsageError(f"invalid configuration{where}: {e}") from None

    def __str__(self) -> str:
        # twistd prints the whole help before a usage error; for a bad
        # config file the one line that says what is wrong is what matters.
        if self._failed:
            return "Usage: twistd [options] oproxy [--config FILE] (see --help)"
        return super().__str__()


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory, without a log line for every upstream
    connection opened and closed.
    """

    noisy = False


def connection_pool(reactor: Any) -> HTTPConnectionPool:
    """
    The one set of persistent upstream connections the whole process shares.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    pool.retryAutomatically = False
    pool._factory = _QuietClientFactory  # type: ignore[attr-defined]
    return pool


def build_app(config: Config, reactor: Any, pool: HTTPConnectionPool) -> ProxyApp:
    """
    Wire the app: one upstream client per backend over the shared pool.
    """
    clock: IReactorTime = reactor
    backends = []
    for backend_config in config.backends:
        agent = Agent(reactor, pool=pool, connectTimeout=backend_config.timeouts.connect)
        upstream = Upstream(backend_config, treq.client.HTTPClient(agent), clock)
        backends.append(OllamaBackend(upstream))
    images_client = treq.client.HTTPClient(
        Agent(reactor, pool=pool, connectTimeout=config.images.timeout)
    )
    return ProxyApp(config, Router(backends), clock=clock, http_client=images_client)


def makeService(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config = options.config
    assert config is not None
    app = build_app(config, reactor, connection_pool(reactor))
    site = ProxySite(app.resource(), lambda: app.config.max_body_bytes)
    site.displayTracebacks = False
    site.noisy = False
    top = service.MultiService()
    for endpoint in config.listen:
        strports.service(endpoint, site, reactor=reactor).setServiceParent(top)
    return top
