"""
Reloading the configuration without a restart.

A new file is validated in full before anything changes; then the app's
snapshot, router and plugins are swapped together.  A request in flight keeps the
snapshot it started with.  A bad file is reported and ignored: the running
configuration stays.  ``SIGHUP`` and a change of the file on disk
(:mod:`oproxy.watch`) both end up in :meth:`Reloader.reload`.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from oproxy.app import ProxyApp
from oproxy.cache import ResponseCache
from oproxy.config import Config, ConfigError
from oproxy.config.restart import RESTART_ONLY, waiting_for_restart
from oproxy.plugins.chain import Chain
from oproxy.routing.router import Router

log = Logger()

#: One constant message for each setting that waits for a restart.
_RESTART_WARNINGS = {
    label: f"{label} changes take effect at the next restart" for _, label in RESTART_ONLY
}


class Reloader:
    """Swap in a freshly loaded configuration when asked to."""

    def __init__(
        self,
        app: ProxyApp,
        load: Callable[[], Config],
        build_router: Callable[[Config], Router],
        build_cache: Callable[[Config], ResponseCache],
        *,
        retire_cache: Callable[[ResponseCache], object],
        source: str | None = None,
    ) -> None:
        """
        The app's plugins (if it has any) are rebuilt for the new
        configuration before anything is swapped: a plugin that cannot be
        built refuses the file like any mistake in it.

        :param retire_cache: takes a cache the new configuration replaced;
            the process's tree closes it (and a stop waits for that).
        :param source: the file ``load`` reads, named in the log so that an
            operator who edited it sees which file was refused and why.
        """
        self._app = app
        self._source = source or "(embedded defaults)"
        self._load = load
        self._build_router = build_router
        self._build_cache = build_cache
        self._retire_cache = retire_cache

    def reload(self) -> bool:
        """
        Load, validate and swap; return whether the new configuration is live.
        """
        host = self._app.plugins
        try:
            config = self._load()
            plugins: Chain | None = host.build(config.plugins) if host is not None else None
        except (ConfigError, OSError) as e:
            log.error(
                "Configuration {source} not reloaded, keeping the running one: {reason}",
                source=self._source,
                reason=str(e),
            )
            return False
        old = self._app.config
        for label in waiting_for_restart(config, old):
            log.warn(_RESTART_WARNINGS[label])
        previous = self._app.cache
        cache = previous if config.cache == old.cache else self._build_cache(config)
        self._app.swap(config, self._build_router(config), cache, plugins)
        if host is not None and plugins is not None:
            host.commit(plugins)
        if cache is not previous:
            self._retire_cache(previous)
        log.info("Configuration reloaded from {source}", source=self._source)
        return True
