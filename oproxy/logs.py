"""
The access log: one JSON line per request, rotated without losing a line.

Every process (each worker, or the single process) appends whole lines with
one ``write`` to a file opened with ``O_APPEND``, so lines from several
workers never interleave.  Exactly one process rotates (the master, or the
single process): it renames the file and starts a new one.  A writer notices
the rename (the path no longer names its open file) within a second and
reopens; until then its lines go to the renamed file, complete.  So no line
is lost or split across a rotation.

Nothing secret is written: the key's *name*, never the key, and no bodies.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson
from twisted.application import service
from twisted.internet import task
from twisted.logger import FileLogObserver, Logger, eventAsJSON, formatEvent

from oproxy.config import AccessLogConfig

log = Logger()

#: How often writers look for a rotation, and the rotator for a reason to rotate.
CHECK_INTERVAL = 1.0


REDACTED = "[redacted]"


def redacted(value: Any, keys: frozenset[str]) -> Any:
    """``value`` with every field named in ``keys`` (any depth) replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if k.lower() in keys else redacted(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(item, keys) for item in value]
    return value


def body_for_log(value: Any, keys: frozenset[str], cap: int) -> str:
    """A body as JSON text for the access log: redacted, then cut to ``cap`` bytes."""
    text = orjson.dumps(redacted(value, keys)).decode("utf-8")
    encoded = text.encode("utf-8")
    if len(encoded) <= cap:
        return text
    return encoded[:cap].decode("utf-8", "ignore") + "…[truncated]"


class AccessLog:
    """
    Appends JSON lines to the access log; reopens it after a rotation.

    Built without touching the file: the process's service tree opens it
    when it starts (a path that cannot be written stops the start) and
    closes it once the last request's line is written.  A line written
    before :meth:`open` opens the file itself.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._inode: tuple[int, int] | None = None

    def open(self) -> None:
        """Open (or create) the file, if it is not open yet."""
        if self._fd < 0:
            self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        stat = os.fstat(fd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._inode = fd, (stat.st_dev, stat.st_ino)

    def write(self, record: Mapping[str, Any]) -> None:
        """One record, one line, one ``write``."""
        if self._fd < 0:
            self._open()
        os.write(self._fd, orjson.dumps(record) + b"\n")

    def reopen_if_rotated(self) -> None:
        if self._fd < 0:
            return  # not open (yet, or any more): nothing to follow
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._open()
            return
        if (stat.st_dev, stat.st_ino) != self._inode:
            self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def rotate(config: AccessLogConfig) -> None:
    """
    ``path`` → ``path.1`` → ``path.2`` …, keeping ``keep`` files, then a new
    empty ``path``.  Writers still holding the old file finish their lines
    in ``path.1``.
    """
    for index in range(config.keep, 0, -1):
        older = f"{config.path}.{index}"
        if index == config.keep:
            if os.path.exists(older):
                os.unlink(older)
            continue
        if os.path.exists(older):
            os.rename(older, f"{config.path}.{index + 1}")
    if os.path.exists(config.path):
        os.rename(config.path, f"{config.path}.1")
    os.close(os.open(config.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))


class Rotator:
    """Decides when to rotate: by size, or when the UTC day changes."""

    def __init__(self, config: AccessLogConfig, clock: Any) -> None:
        self._config = config
        self._clock = clock
        self._day = self._today()

    def _today(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self._clock.seconds()))

    def check(self) -> bool:
        """Rotate if it is time; return whether it did."""
        try:
            size = os.path.getsize(self._config.path)
        except FileNotFoundError:
            size = 0
        today = self._today()
        due = (self._config.max_bytes is not None and size > self._config.max_bytes) or (
            self._config.daily and today != self._day and size > 0
        )
        self._day = today
        if due:
            rotate(self._config)
            log.info("Rotated the access log {path}", path=self._config.path)
        return due


class AccessLogService(service.Service):
    """
    Keep a writer's file current and, in the one rotating process, rotate.

    The file itself belongs to the process's tree, which closes it after
    the last request's line (this service stops before that).
    """

    def __init__(self, clock: Any, access_log: AccessLog | None, rotator: Rotator | None) -> None:
        self._clock = clock
        self._access_log = access_log
        self._rotator = rotator
        self._loop: task.LoopingCall | None = None

    def _tick(self) -> None:
        if self._rotator is not None:
            self._rotator.check()
        if self._access_log is not None:
            self._access_log.reopen_if_rotated()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(CHECK_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()


def json_lines(event: Mapping[str, Any]) -> str:
    """
    One application log event as one line of JSON, for log shippers.

    Twisted's own ``eventAsJSON`` keeps every field; the formatted message
    is added as ``message`` and a failure as ``traceback``, which is what a
    reader of the shipped logs looks for.
    """
    record = orjson.loads(eventAsJSON(dict(event)))
    record["message"] = formatEvent(dict(event))
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    level = event.get("log_level")
    record["level"] = level.name if level is not None else None
    return orjson.dumps(record).decode("utf-8") + "\n"


def json_observer() -> FileLogObserver:
    """
    ``twistd --logger=oproxy.logs.json_observer``: JSON lines on stdout.
    """
    return FileLogObserver(sys.stdout, json_lines)
