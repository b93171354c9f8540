"""
Reloading when the configuration file changes on disk.

:class:`ConfigWatcher` polls the file's identity (modification time, size
and inode) rather than asking the kernel for events.  Polling a single
``stat`` every couple of seconds costs nothing measurable, works the same on
every platform and filesystem (inotify does not exist on macOS or the BSDs
and misses changes on network filesystems and some container mounts), and
needs no extra dependency.  It also copes with the two ways a file is
usually replaced rather than rewritten, which event watches get wrong unless
they watch the directory: editors that write a new file and rename it over
the old one, and Kubernetes ConfigMaps, which swap a symlink to a new
directory.  Because the path is looked up (and symlinks followed) at every
poll, both show up as a new inode.

A change is acted on only once the file has stayed the same for one more
poll, so a file still being written is not read half-way.  A file that
vanishes (deleted, or between an editor's unlink and write) is reported once
and otherwise ignored: the running configuration stays until the file comes
back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

#: Seconds between two looks at the file.
DEFAULT_INTERVAL = 2.0


class Identity(NamedTuple):
    """
    What tells one version of the file from another without reading it.

    The inode catches a rename or a symlink swap even when the new file has
    the old one's size and time; the time and size catch a rewrite in place.
    """

    mtime_ns: int
    size: int
    inode: int


def identify(path: str) -> Identity:
    """
    The identity of whatever ``path`` names now, following symlinks.

    :raises OSError: the file cannot be looked at (gone, or not allowed).
    """
    stat = os.stat(path)
    return Identity(stat.st_mtime_ns, stat.st_size, stat.st_ino)


class ConfigWatcher(service.Service):
    """
    Call ``on_change`` once the file at ``path`` has changed and settled.

    ``on_change`` is the same entry point ``SIGHUP`` uses, so a file change
    and a signal reload alike: validated in full, and ignored (with the
    reason logged) when the new file is bad.  The watcher itself never reads
    the file.

    :param interval: seconds between polls; a change is acted on between
        one and two intervals after the file stops changing.
    """

    def __init__(
        self,
        path: str,
        on_change: Callable[[], object],
        clock: IReactorTime,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.path = path
        self.interval = interval
        self._on_change = on_change
        self._clock = clock
        self._loop: task.LoopingCall | None = None
        #: The identity of the version the running configuration came from.
        self._current: Identity | None = None
        #: A new identity seen at the last poll, waiting to be seen again.
        self._pending: Identity | None = None
        #: Whether the file's absence was already reported.
        self._missing = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # The running configuration was read from the file moments ago: what
        # is there now is what it came from.
        self._current = self._look()
        loop = task.LoopingCall(self.poll)
        loop.clock = self._clock
        loop.start(self.interval, now=False)
        self._loop = loop

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def poll(self) -> None:
        """Look at the file once; reload if it changed and has settled."""
        seen = self._look()
        if seen is None or seen == self._current:
            # A version that came back unchanged (moved away and back) is
            # the running one: nothing to do.
            self._pending = None
            return
        if seen != self._pending:
            # Changed since the last look: it may still be being written.
            self._pending = seen
            return
        self._current, self._pending = seen, None
        log.info("Configuration file {path} changed; reloading", path=self.path)
        try:
            self._on_change()
        except Exception:
            # The loop must survive whatever the reload does.
            log.failure("Reloading after {path} changed", path=self.path)

    def _look(self) -> Identity | None:
        try:
            seen = identify(self.path)
        except OSError as e:
            if not self._missing:
                self._missing = True
                log.warn(
                    "Configuration file {path} cannot be read ({reason}); "
                    "keeping the running configuration until it is back",
                    path=self.path,
                    reason=e.strerror or str(e),
                )
            return None
        if self._missing:
            self._missing = False
            log.info("Configuration file {path} is back", path=self.path)
        return seen
