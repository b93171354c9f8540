"""
The app the composition root wires: the services in force, the pipeline
that serves with them, and the web resource over the route table.

Handlers never see this object: they get a :class:`~oproxy.api.scope.Scope`
holding a :class:`~oproxy.api.services.Services` record.  The services it
names as attributes are for the composition root, the services that run
beside the app (probes, reloads, drain) and tests.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource

from oproxy.after_send import AfterSend
from oproxy.api.services import Services
from oproxy.cache import ResponseCache
from oproxy.certs.report import CertificateReport
from oproxy.config import Config
from oproxy.console.parts import Console
from oproxy.images.fetch import Images
from oproxy.logs import AccessLog
from oproxy.metrics import Metrics
from oproxy.plugins.chain import Chain
from oproxy.plugins.host import PluginHost
from oproxy.routing.router import Router
from oproxy.security.guard import Guard
from oproxy.web.pipeline import Pipeline
from oproxy.web.routes import klein_app


class ProxyApp:
    """
    The OpenAI API (and Ollama's native one, for Ollama's clients), served
    by Klein in front of a :class:`Router`.
    """

    def __init__(
        self,
        config: Config,
        router: Router,
        *,
        clock: IReactorTime,
        images: Images,
        cache: ResponseCache,
        metrics: Metrics,
        guard: Guard,
        access_log: AccessLog | None = None,
        after_send: AfterSend | None = None,
        certificates: CertificateReport | None = None,
        console: Console | None = None,
        plugins: PluginHost | None = None,
    ) -> None:
        """
        :param after_send: runs counting and logging once answers are sent
            (one of its own unless given).
        :param certificates: what ``/v1/health`` says about certificates.
        :param console: the admin console's parts, if it is served.
        :param plugins: the plugins built from the configuration, whose
            chain is in force (none, unless given).
        """
        services = Services(
            config=config,
            router=router,
            cache=cache,
            clock=clock,
            images=images,
            guard=guard,
            metrics=metrics,
            after_send=after_send or AfterSend(clock),
            access_log=access_log,
            up_since=clock.seconds(),
            certificates=certificates,
            console=console,
            plugins=plugins.chain if plugins is not None else (),
        )
        self.pipeline = Pipeline(services)
        self._resource: IResource | None = None
        # The services in force, by name, for the composition root: plain
        # attributes, as the site reads the limits for every request.
        self.config, self.router, self.cache = config, router, cache
        self.clock, self.images, self.guard = clock, images, guard
        self.metrics, self.access_log = metrics, access_log
        self.after_send = services.after_send
        self.plugins = plugins

    @property
    def services(self) -> Services:
        """What a request starting now gets."""
        return self.pipeline.services

    def swap(
        self, config: Config, router: Router, cache: ResponseCache, plugins: Chain | None = None
    ) -> None:
        """Make a new configuration live; requests in flight keep theirs."""
        self.pipeline.services = self.pipeline.services.reloaded(config, router, cache, plugins)
        self.config, self.router, self.cache = config, router, cache

    def resource(self) -> IResource:
        """The web resource serving the route table (:mod:`oproxy.web.routes`)."""
        if self._resource is None:
            self._resource = klein_app(self.pipeline).resource()
        return self._resource

    @property
    def draining(self) -> bool:
        """Set while the process stops: answers close their connection."""
        return self.pipeline.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.pipeline.draining = value
