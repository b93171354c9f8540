"""
Finding the installed plugins, by name.

Two ways in, both cheap and both searched every time a configuration that
enables plugins is read (so ``oproxy check-config`` sees what the daemon
would):

* Twisted's plugin system, ``getPlugins(IPluginFactory, oproxy.plugins)``:
  a module in any ``oproxy/plugins/`` directory on ``sys.path`` (the shipped
  plugins are found this way too);
* the ``oproxy.plugins`` entry point group of installed distributions,
  each entry naming a factory (``footer = "oproxy_footer:factory"``).

A plugin that fails to import is logged and reported when the
configuration names it, rather than hiding the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from twisted.logger import Logger
from twisted.plugin import getPlugins

import oproxy.plugins
from oproxy.plugins.interface import IPluginFactory

log = Logger()

#: The entry point group a distribution lists its plugin factories under.
ENTRY_POINT_GROUP = "oproxy.plugins"


@dataclass(frozen=True)
class Installed:
    """
    The plugins found, by name.

    :ivar factories: every factory, by its name; a name two different
        factories claim is in :attr:`ambiguous` instead.
    :ivar broken: entry points that could not be loaded, by entry point
        name, with the reason.
    """

    factories: Mapping[str, IPluginFactory] = field(default_factory=dict)
    ambiguous: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    broken: Mapping[str, str] = field(default_factory=dict)

    def find(self, name: str) -> IPluginFactory:
        """
        The factory named ``name``.

        :raises LookupError: with a sentence that says why there is none.
        """
        factory = self.factories.get(name)
        if factory is not None:
            return factory
        if name in self.ambiguous:
            raise LookupError(
                f"more than one installed plugin is named {name!r} "
                f"({', '.join(self.ambiguous[name])})"
            )
        if name in self.broken:
            raise LookupError(f"the plugin {name!r} could not be loaded: {self.broken[name]}")
        listed = ", ".join(sorted(self.factories)) or "none"
        raise LookupError(f"no plugin named {name!r} is installed (installed: {listed})")


def _origin(factory: object) -> str:
    return getattr(type(factory), "__module__", "?")


def installed() -> Installed:
    """Search both ways for plugin factories."""
    found: list[tuple[str, IPluginFactory]] = [
        (_origin(f), f) for f in getPlugins(IPluginFactory, oproxy.plugins)
    ]
    broken: dict[str, str] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as e:
            log.failure("The plugin entry point {entry} could not be loaded", entry=entry.value)
            broken[entry.name] = f"{type(e).__name__}: {e}"
            continue
        if not IPluginFactory.providedBy(loaded):
            broken[entry.name] = f"{entry.value} is not a plugin factory (IPluginFactory)"
            continue
        found.append((entry.value, loaded))
    factories: dict[str, IPluginFactory] = {}
    origins: dict[str, list[str]] = {}
    for origin, factory in found:
        name = factory.name
        if name in factories and factories[name] is not factory:
            origins[name].append(origin)
        elif name not in factories:
            factories[name] = factory
            origins[name] = [origin]
    ambiguous = {name: tuple(where) for name, where in origins.items() if len(where) > 1}
    for name in ambiguous:
        del factories[name]
    return Installed(factories, ambiguous, broken)
