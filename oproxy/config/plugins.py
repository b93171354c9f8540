"""
The ``plugins:`` section: which plugins run, in which order, on what.

::

    plugins:
      - name: pii-redact
      - name: block-words
        config: {patterns: ["forbidden-topic"]}
        routes: ["/v1/chat/completions", "/api/chat"]
        keys: [alice]
        models: ["llama3*"]
        on_error: reject

Names are resolved when the file is read (:mod:`oproxy.config.resolving`):
a name no installed plugin has, or an option its plugin does not take, is
an error naming it (``plugins[1].config.patterns: ...``), so ``oproxy
check-config`` and a reload refuse it like any other mistake.
"""

from __future__ import annotations

from typing import Annotated, Any

import attrs

from oproxy.config.values import FileKey, Seconds, invalid, mapping, one_of

ON_ERROR = ("reject", "skip")
#: Seconds a hook's awaited result may take, unless the entry says otherwise.
DEFAULT_TIMEOUT = 2.0


def route_pattern(value: Any) -> str:
    """A route's path, or a glob of paths (``/api/*``)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise invalid(
            f"must be a route such as /v1/chat/completions or a glob such as /api/*, not {value!r}"
        )
    return value


def raw_options(value: Any) -> Any:
    """The plugin's own mapping, read later by its options class."""
    return {} if value is None else mapping(value)


RoutePattern = Annotated[str, route_pattern]
OnError = Annotated[str, one_of(*ON_ERROR)]


@attrs.frozen
class PluginConfig:
    """
    One enabled plugin.

    :ivar name: the plugin's name, as installed.
    :ivar config: its options, read into the class it declares (``None``
        when it takes none).
    :ivar routes: where it applies (paths or globs; default everywhere).
    :ivar keys: for which callers' keys (names or globs; default anyone,
        anonymous callers included).
    :ivar models: for which requested models (globs; default any).
    :ivar on_error: what its failure or timeout means for the request.
    :ivar timeout: seconds any of its hooks may take.
    :ivar factory: the installed factory the name was resolved to.
    """

    name: str
    config: Annotated[Any, raw_options] = None
    routes: tuple[RoutePattern, ...] = ()
    keys: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    on_error: OnError = "reject"
    timeout: Seconds = DEFAULT_TIMEOUT
    factory: Annotated[Any, FileKey(None)] = attrs.field(default=None, eq=False, repr=False)

    @property
    def rejects(self) -> bool:
        return self.on_error == "reject"
