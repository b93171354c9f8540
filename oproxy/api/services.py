"""
What a handler may use: a frozen record of the process's services.

Handlers get this record (through their :class:`~oproxy.api.scope.Scope`),
never the app that holds it, so they depend on a few named things and can
be tested with any of them replaced.  A reload makes a new record (new
configuration, router and, if its settings changed, cache) and swaps one
reference; a request in flight keeps the record it started with, so it
sees one configuration from its first step to its last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from twisted.internet.interfaces import IReactorTime

from oproxy.after_send import AfterSend
from oproxy.cache import ResponseCache
from oproxy.certs.report import CertificateReport
from oproxy.config import Config
from oproxy.console.parts import Console
from oproxy.images.fetch import Images
from oproxy.logs import AccessLog
from oproxy.metrics import Metrics
from oproxy.plugins.chain import Chain
from oproxy.routing.router import Router
from oproxy.security.guard import Guard
from oproxy.state.base import IStateStore


@dataclass(frozen=True, slots=True)
class Services:
    """
    :ivar config: the configuration snapshot.
    :ivar router: model names to backends, for this configuration.
    :ivar cache: the response cache, for this configuration.
    :ivar clock: the reactor's time and timed calls.
    :ivar images: fetches and converts a chat's images.
    :ivar guard: keys, permissions, limits and quotas over the state store.
    :ivar metrics: the process's Prometheus metrics.
    :ivar after_send: runs work once the answers written now are sent.
    :ivar access_log: the JSON access log, when one is configured.
    :ivar up_since: when the process began serving (the clock's time).
    :ivar certificates: the certificates the daemon serves and renews, as
        the files say (``None``: it has none to speak of).
    :ivar console: what the admin console keeps between requests (``None``:
        no console in this process).
    :ivar plugins: the plugins in force, in order (empty: none enabled).
    """

    config: Config
    router: Router
    cache: ResponseCache
    clock: IReactorTime
    images: Images
    guard: Guard
    metrics: Metrics
    after_send: AfterSend
    access_log: AccessLog | None = None
    up_since: float = 0.0
    certificates: CertificateReport | None = None
    console: Console | None = None
    plugins: Chain = ()

    @property
    def state(self) -> IStateStore:
        """The state store the guard keeps keys and limits in (stored responses too)."""
        return self.guard.store

    def reloaded(
        self, config: Config, router: Router, cache: ResponseCache, plugins: Chain | None = None
    ) -> Services:
        """The record for a new configuration; everything else stays."""
        if plugins is None:
            plugins = self.plugins
        return replace(self, config=config, router=router, cache=cache, plugins=plugins)
