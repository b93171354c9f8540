"""
The settings a reload cannot apply: they are read once, as the process starts.

The reload warns about them and the console's editor says so before a new
file is applied; both ask here, so the two never disagree about which
settings wait for a restart.
"""

from __future__ import annotations

from oproxy.config.schema import Config

#: Each setting (or settings that go together) that waits for a restart, and
#: how people call it.
RESTART_ONLY: tuple[tuple[tuple[str, ...], str], ...] = (
    (("listen", "workers"), "listen and workers"),
    (("state",), "state (where keys and limits are kept)"),
    (("access_log",), "access_log"),
    (("reload",), "reload (the file watch)"),
    (("certificates",), "certificates"),
)


def waiting_for_restart(new: Config, running: Config) -> list[str]:
    """The restart-only settings ``new`` changes from ``running``, as people call them."""
    return [
        label
        for names, label in RESTART_ONLY
        if any(getattr(new, name) != getattr(running, name) for name in names)
    ]
