"""
Resolving the ``plugins:`` list: each name to an installed plugin, each
``config:`` read into the options class that plugin declares, by the same
strict reader as the rest of the file, so that its errors read alike
(``plugins[1].config.patterns[0]: ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from oproxy.config.plugins import PluginConfig
from oproxy.config.reading import structure
from oproxy.config.values import ConfigError, items
from oproxy.plugins.discovery import installed
from oproxy.plugins.interface import IPluginFactory

#: How a plugin's name becomes its factory; raises ``LookupError`` saying why not.
Finder = Callable[[str], IPluginFactory]


def read_plugins(value: Any, find: Finder | None = None) -> tuple[PluginConfig, ...]:
    """
    The ``plugins:`` list, each name resolved and each ``config:`` read.

    :param find: the installed plugins (by default, those
        :func:`oproxy.plugins.discovery.installed` finds, searched once).
    """
    if value is None or value == []:
        return ()
    resolve = installed().find if find is None else find

    def one(item: Any) -> PluginConfig:
        entry = structure(item, PluginConfig)
        try:
            factory = resolve(entry.name)
        except LookupError as e:
            raise ConfigError("name", str(e.args[0] if e.args else e)) from None
        try:
            options = _options(factory, entry.config)
        except ConfigError as e:
            raise e.within("config") from None
        return attrs.evolve(entry, config=options, factory=factory)

    try:
        return items(value, one)
    except ConfigError as e:
        raise e.within("plugins") from None


def _options(factory: IPluginFactory, given: dict[str, Any] | None) -> Any:
    given = given or {}
    kind = factory.options
    if kind is None:
        if given:
            raise ConfigError(
                sorted(given)[0], "is not a known setting (the plugin takes no options)"
            )
        return None
    return structure(given, kind)
