"""
The child side of multi-process serving: ``python -m oproxy.worker``.

A worker is started by the master (:mod:`oproxy.workers`) with its listening
sockets already open on inherited descriptors and a description of itself in
``$OPROXY_WORKER``.  It builds the same service a single process would,
adopts the sockets, serves, drains on ``SIGTERM``, reloads on ``SIGHUP``, and
exits if the master goes away.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from typing import Any

from twisted.internet import task
from twisted.logger import ILogObserver, Logger, eventAsText, globalLogBeginner
from twisted.python.threadable import isInIOThread
from zope.interface import provider

from oproxy.listeners import adopt
from oproxy.tap import load_configuration, report_errors, serve_here
from oproxy.workers import READY

log = Logger()

#: How often a worker checks that its master is still alive.
PARENT_CHECK_INTERVAL = 1.0


class BatchedLines:
    """
    Log lines for the master, written with one ``write`` per reactor turn.

    Under load a worker logs a line per request; a write (and so a wake-up
    of the master) per line costs the machine more than relaying the request
    did.  Lines gathered while the reactor runs callbacks are written when it
    next turns, and whatever is left when the process exits.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._pending: list[bytes] = []

    def add(self, line: str) -> None:
        if not isInIOThread():
            # Only the reactor's thread touches the batch.
            self._reactor.callFromThread(self.add, line)
            return
        if not self._pending:
            self._reactor.callLater(0, self.flush)
        self._pending.append(line.encode("utf-8", "replace") + b"\n")

    def flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


def _log_to_stdout(reactor: Any) -> BatchedLines:
    """
    Plain lines on stdout, which the master relays into its own log.
    """
    sys.stdout.flush()
    out = BatchedLines(reactor, sys.stdout.fileno())

    @provider(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        out.add(eventAsText(event, includeTimestamp=False, includeSystem=True))

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return out


def _watch_parent(reactor: Any) -> task.LoopingCall:
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            log.warn("Master process is gone; stopping")
            reactor.stop()

    watcher = task.LoopingCall(check)
    watcher.clock = reactor
    watcher.start(PARENT_CHECK_INTERVAL, now=False)
    return watcher


def main() -> None:
    from twisted.internet import reactor

    spec = json.loads(os.environ["OPROXY_WORKER"])
    out = _log_to_stdout(reactor)
    atexit.register(out.flush)
    config = load_configuration(spec["config"], spec["listen"], spec["backend"])
    report_errors(reactor, config)
    top = serve_here(
        reactor,
        (spec["config"], spec["listen"], spec["backend"]),
        config,
        lambda site: [
            adopt(reactor, description, fd, site) for fd, description in spec["listeners"]
        ],
        rotate_access_log=False,  # the master rotates
        watch_config=False,  # the master watches the file and signals us
        request_lines=out.add,  # no log event per request: the master logs the line
    )
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    _watch_parent(reactor)
    reactor.callWhenRunning(_announce_ready, spec["index"], out)
    reactor.run()


def _announce_ready(index: int, out: BatchedLines) -> None:
    """Tell the master (and the log) that this worker serves and takes signals."""
    log.info("Worker {index} serving (pid {pid})", index=index, pid=os.getpid())
    out.add(READY.decode("ascii"))


if __name__ == "__main__":
    main()
