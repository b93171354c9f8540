"""
Plugins: code of one's own on the request, the answer, every streamed
chunk, and after the answer is sent (see ``docs/plugins.rst``).

:mod:`~oproxy.plugins.interface` is what a plugin author writes against;
:mod:`~oproxy.plugins.discovery` finds the installed plugins,
:mod:`~oproxy.plugins.chain` runs the configured ones for each request and
:mod:`~oproxy.plugins.host` owns them (and the services some of them are).
The shipped plugins are a module each: ``pii_redact``, ``system_prompt``,
``block_words``, ``webhook`` and ``max_tokens_cap``.

This package is also where plugins are dropped in, as ``twisted.plugins``
is for Twisted: any ``oproxy/plugins/`` directory on ``sys.path`` that is
not a package of its own (no ``__init__.py`` there, nor in its ``oproxy/``)
is searched too, so a separately installed distribution can add a module
here without owning the package.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
