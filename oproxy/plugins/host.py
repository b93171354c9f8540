"""
The owner of the plugins built from the configuration.

:class:`PluginHost` builds the chain for a configuration and, being a
service of the process's tree, runs the plugins that are services (a
webhook's queue and sender): they start with the process and stop after
its last answer has been counted, and their stop is waited for (a webhook
delivers what it holds within its own deadline) before the upstream
connections close.

A reload builds a new chain (:meth:`PluginHost.build`: nothing is started
or stopped, so a plugin that cannot be built refuses the reload and leaves
everything as it was), swaps it in with the rest of the configuration,
then :meth:`PluginHost.commit` starts the plugins it added and stops those
it dropped.  An entry whose name and options are unchanged keeps its
plugin, state and all; a change of its filters, ``on_error`` or
``timeout`` is not a change of the plugin.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from oproxy.config.plugins import PluginConfig
from oproxy.config.values import ConfigError
from oproxy.plugins.chain import Chain, Enabled, Pending
from oproxy.plugins.interface import Environment

log = Logger()


class PluginHost(service.MultiService):
    """
    :ivar chain: the chain in force (the last committed).
    :ivar pending: completion hooks still running, which a stop waits for.
    """

    def __init__(self, environment: Environment) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._environment = environment
        self.pending = Pending()
        self.chain: Chain = ()
        #: Plugins a reload dropped, stopping.
        self._retiring: set[defer.Deferred[None]] = set()

    def build(self, entries: Sequence[PluginConfig]) -> Chain:
        """
        The chain for ``entries``, the plugins of unchanged entries kept;
        nothing is in force until :meth:`commit`.

        :raises ConfigError: a plugin cannot be built (naming its entry).
        """
        reusable = [(enabled.settings, enabled.plugin) for enabled in self.chain]
        built = []
        for index, entry in enumerate(entries):
            plugin = _take(reusable, entry)
            try:
                if plugin is None:
                    plugin = entry.factory.build(entry.config, self._environment)
                built.append(Enabled.of(entry, plugin, self.pending))
            except Exception as e:
                raise ConfigError(
                    f"plugins[{index}]", f"the plugin {entry.name!r} cannot be built: {e}"
                ) from e
        return tuple(built)

    def commit(self, chain: Chain) -> None:
        """
        Put ``chain`` in force: start the services it adds, stop the ones
        it no longer has (requests in flight keep the chain they began with,
        whose stopped plugins drop what they are given).
        """
        kept = {id(enabled.plugin) for enabled in chain}
        for enabled in self.chain:
            plugin = enabled.plugin
            if id(plugin) not in kept and service.IService.providedBy(plugin):
                self._retire(service.IService(plugin))
        for enabled in chain:
            plugin = enabled.plugin
            if service.IService.providedBy(plugin) and plugin not in list(self):
                self.addService(service.IService(plugin))  # type: ignore[no-untyped-call]
        self.chain = chain

    def _retire(self, plugin: service.IService) -> None:
        if plugin not in list(self):
            return
        stopping = defer.maybeDeferred(self.removeService, plugin)
        stopping.addErrback(lambda failure: log.failure("Stopping a plugin failed", failure))
        if not stopping.called:
            self._retiring.add(stopping)
            stopping.addBoth(lambda _: self._retiring.discard(stopping))

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # The last completion hooks first (each bounded by its timeout):
        # what they hand to a plugin's service is then delivered by its stop.
        await self.pending.settled()
        await super().stopService()  # type: ignore[no-untyped-call]
        while self._retiring:
            await defer.DeferredList(list(self._retiring))


def _take(reusable: list[tuple[PluginConfig, object]], entry: PluginConfig) -> object | None:
    """The plugin built for an equal name and options, taken (each at most once)."""
    for index, (settings, plugin) in enumerate(reusable):
        if settings.name == entry.name and settings.config == entry.config:
            del reusable[index]
            return plugin
    return None
