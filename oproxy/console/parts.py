"""
What the console keeps between requests, built by the composition root and
held by the services record: sessions, the traffic the access log tells,
the totals the metrics tell, and what the configuration editor needs (the
file, how the daemon loads it, and how every worker is told to reload).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import task, threads
from twisted.internet.interfaces import IReactorTime

from oproxy.config import Config, load_config
from oproxy.console.follow import InThread, LogFollower
from oproxy.console.sessions import Sessions, SessionSecret
from oproxy.console.totals import Totals
from oproxy.metrics import Metrics

#: Tells every process serving to reload the file; whether this one did.
Reload = Callable[[], Awaitable[bool]]

#: Seconds a worker waits for the reload its master passes on.
RELOAD_WAIT = 10.0

SIGNING_FILE = "console-signing-key"
LOCK_FILE = "console-config.lock"


@dataclass(frozen=True)
class ConfigSource:
    """
    Where the configuration comes from, for the editor.

    :ivar path: the ``--config`` file (``None``: embedded defaults).
    :ivar load: reads a configuration text as a reload would (overrides
        from the command line included).
    :ivar reload_all: reloads every worker, once a new file is in place
        (``None``: nothing to reload).
    """

    path: str | None
    load: Callable[[str], Config]
    reload_all: Reload | None = None


def defaults_only() -> ConfigSource:
    """No file: the editor shows nothing and writes nothing."""
    return ConfigSource(None, lambda text: load_config(text, os.environ))


@dataclass
class Console:
    """
    :ivar sessions: signs and checks session cookies and CSRF tokens.
    :ivar follower: the access log's last hour, when there is an access log.
    :ivar totals: the metrics' totals since the start.
    :ivar config_path: the ``--config`` file (``None``: embedded defaults).
    :ivar lock_path: the lock one apply at a time holds.
    :ivar load: reads a configuration text as a reload would (overrides
        from the command line included).
    :ivar reload_all: reloads every worker, once a new file is in place.
    :ivar in_thread: runs file work off the reactor thread.
    """

    sessions: Sessions
    follower: LogFollower | None
    totals: Totals
    config_path: str | None
    lock_path: str
    load: Callable[[str], Config]
    reload_all: Reload | None
    in_thread: InThread = threads.deferToThread

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.totals.stop()


def build_console(
    config: Config,
    clock: IReactorTime,
    metrics: Metrics,
    *,
    access_log_path: str | None,
    source: ConfigSource,
    in_thread: InThread = threads.deferToThread,
) -> Console:
    """The console's parts, built without I/O (the secret is read on first use)."""
    state_directory = os.path.dirname(config.state.path) or "."
    follower = (
        LogFollower(access_log_path, clock, in_thread=in_thread)
        if access_log_path is not None
        else None
    )
    return Console(
        sessions=Sessions(SessionSecret(os.path.join(state_directory, SIGNING_FILE)), clock),
        follower=follower,
        totals=Totals(metrics, clock, in_thread),
        config_path=source.path,
        lock_path=os.path.join(state_directory, LOCK_FILE),
        load=source.load,
        reload_all=source.reload_all,
        in_thread=in_thread,
    )


class ConsoleService(service.Service):
    """Stops following the access log when the process stops."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.console.stop()


def reload_here(reload: Callable[[], bool]) -> Reload:
    """A single process reloads itself, as ``SIGHUP`` makes it."""

    async def run() -> bool:
        return reload()

    return run


def reload_through_master(
    clock: IReactorTime, current: Callable[[], Any], wait: float = RELOAD_WAIT
) -> Reload:
    """
    A worker cannot reload the others: it sends its master ``SIGHUP``, which
    the master passes on to every worker (this one too), as it does with
    its own ``SIGHUP``.  Then it waits until its own configuration has been
    replaced, which says the signal went round.

    :param current: this worker's configuration now.
    """

    async def run() -> bool:
        master = os.getppid()
        if master <= 1:
            return False
        before = current()
        os.kill(master, signal.SIGHUP)
        deadline = clock.seconds() + wait
        while current() is before:
            if clock.seconds() >= deadline:
                return False
            await task.deferLater(clock, 0.05, lambda: None)
        return True

    return run
