"""
The child side of multi-process serving: ``python -m oproxy.worker``.

A worker is started by the master (:mod:`oproxy.workers`) with its listening
sockets already open on inherited descriptors and a description of itself in
``$OPROXY_WORKER``.  It builds the same service tree a single process would
(:class:`oproxy.service.ProxyService`), over the sockets it adopts instead
of binding, serves, drains and closes in the same order on ``SIGTERM``,
reloads on ``SIGHUP``, and stops if the master goes away.  Twisted's
application machinery starts and stops the tree, as ``twistd`` does.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # A terminal sends Ctrl-C to the whole process group.  The master takes
    # it and stops its workers with SIGTERM, which drains; a worker stopping
    # on SIGINT too would stop twice, with a traceback, or die with one while
    # still importing what follows.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

import atexit
import contextlib
import json
import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.application import app, service
from twisted.internet import task
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver, Logger, eventAsText, formatTime, globalLogBeginner
from twisted.python.threadable import isInIOThread
from zope.interface import provider

from oproxy.config import Config
from oproxy.listeners import adopt
from oproxy.service import ProxyService
from oproxy.tap import load_configuration, serving_service
from oproxy.workers import READY

log = Logger()

#: How often a worker checks that its master is still alive.
PARENT_CHECK_INTERVAL = 1.0


class BatchedLines:
    """
    Log lines written with as few ``write`` calls as a reactor turn allows.

    Under load a worker logs a line per request; a write (and so a wake-up
    of whoever reads) per line costs the machine more than relaying the
    request did.  Lines gathered while the reactor runs callbacks are
    written when it next turns, and whatever is left when the process exits.
    No write is larger than ``PIPE_BUF`` and each ends a line, so lines that
    other processes write to the same pipe, socket or file never split ours.
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
        pending, self._pending = self._pending, []
        chunk: list[bytes] = []
        size = 0
        for line in pending:
            if chunk and size + len(line) > select.PIPE_BUF:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


class _Stamped:
    """
    Lines as the master would have logged them, for writing them ourselves.

    ``twistd`` writes ``<time> [<namespace>#<level>] <text>``; relayed lines
    read ``<time> [oproxy.workers#info] worker N: <line>``, and so do these.
    The time is formatted once a second, not once a line.
    """

    def __init__(self, out: BatchedLines, index: int) -> None:
        self._out = out
        self._prefix = f" [oproxy.workers#info] worker {index}: "
        self._second = -1
        self._stamp = ""

    def add(self, line: str) -> None:
        now = time.time()
        if int(now) != self._second:
            self._second, self._stamp = int(now), formatTime(now)
        self._out.add(self._stamp + self._prefix + line)


def _start_logging(reactor: Any, index: int, log_fd: int | None) -> tuple[BatchedLines, Any]:
    """
    Send this process's log lines to the master (on standard output), or,
    given ``log_fd``, write them there in the master's format.

    :return: the batch to flush at exit, and where access lines go.
    """
    sys.stdout.flush()
    out = BatchedLines(reactor, sys.stdout.fileno() if log_fd is None else log_fd)
    sink: BatchedLines | _Stamped = out if log_fd is None else _Stamped(out, index)

    @provider(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        sink.add(eventAsText(event, includeTimestamp=False, includeSystem=True))

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return out, sink.add


class WorkerDuties(service.Service):
    """
    What a worker does besides serving: tell the master it serves (once the
    reactor runs, so its signal handlers are in place), and stop when the
    master has gone away.
    """

    def __init__(self, reactor: Any, interval: float = PARENT_CHECK_INTERVAL) -> None:
        self._reactor = reactor
        self._interval = interval
        self._parent = -1
        self._watch: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._parent = os.getppid()
        self._watch = task.LoopingCall(self._check_parent)
        self._watch.clock = self._reactor
        self._watch.start(self._interval, now=False)
        self._reactor.callLater(0, _announce_ready)

    def _check_parent(self) -> None:
        if os.getppid() != self._parent:
            log.warn("Master process is gone; stopping")
            if self._watch is not None and self._watch.running:
                self._watch.stop()
            with contextlib.suppress(ReactorNotRunning):
                self._reactor.stop()  # unless it is stopping already

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._watch is not None and self._watch.running:
            self._watch.stop()


def worker_service(
    reactor: Any, spec: dict[str, Any], config: Config, request_lines: Callable[[str], None]
) -> ProxyService:
    """The tree a single process would build, over the sockets the master bound."""
    top = serving_service(
        reactor,
        (spec["config"], spec["listen"], spec["backend"]),
        config,
        lambda site: [
            adopt(reactor, description, fd, site) for fd, description in spec["listeners"]
        ],
        rotate_access_log=False,  # the master rotates
        watch_config=False,  # the master watches the file and signals us
        request_lines=request_lines,  # no log event per request
        announce_listeners=False,  # the master said what serves where
        announce_backends=bool(spec.get("announce_backends")),
        worker=True,  # the console's editor reloads every worker through the master
    )
    top.addService(WorkerDuties(reactor))
    return top


def main() -> None:
    from twisted.internet import reactor

    spec = json.loads(os.environ["OPROXY_WORKER"])
    out, request_lines = _start_logging(reactor, spec["index"], spec.get("log_fd"))
    atexit.register(out.flush)
    config = load_configuration(spec["config"], spec["listen"], spec["backend"])
    application = service.Application("oproxy-worker")
    top = worker_service(reactor, spec, config, request_lines)
    top.setServiceParent(application)  # type: ignore[no-untyped-call]
    # As twistd runs a tree: adopt (the privileged step, here without
    # privileges), then start; Twisted stops the tree before the reactor
    # stops, and waits for it to have drained and closed.
    service.IService(application).privilegedStartService()
    app.startApplication(application, False)
    reactor.run()


def _announce_ready() -> None:
    """Tell the master that this worker serves and takes signals; it logs so."""
    os.write(sys.stdout.fileno(), READY + b"\n")


if __name__ == "__main__":
    main()
