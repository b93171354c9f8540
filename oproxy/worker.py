"""
The child side of multi-process serving: ``python -m oproxy.worker``.

A worker is started by the master (:mod:`oproxy.workers`) with its listening
sockets already open on inherited descriptors and a description of itself in
``$OPROXY_WORKER``.  It builds the same service a single process would,
adopts the sockets, serves, drains on ``SIGTERM``, reloads on ``SIGHUP``, and
exits if the master goes away.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import task
from twisted.logger import ILogObserver, Logger, eventAsText, globalLogBeginner
from zope.interface import provider

from oproxy.listeners import adopt
from oproxy.tap import load_configuration, report_errors, serve_here
from oproxy.workers import READY

log = Logger()

#: How often a worker checks that its master is still alive.
PARENT_CHECK_INTERVAL = 1.0


def _log_to_stdout() -> None:
    """
    Plain lines on stdout, which the master relays into its own log.
    """

    @provider(ILogObserver)
    def observer(event: dict[str, Any]) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=True)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


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
    _log_to_stdout()
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
    )
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    _watch_parent(reactor)
    reactor.callWhenRunning(_announce_ready, spec["index"])
    reactor.run()


def _announce_ready(index: int) -> None:
    """Tell the master (and the log) that this worker serves and takes signals."""
    log.info("Worker {index} serving (pid {pid})", index=index, pid=os.getpid())
    sys.stdout.write(READY.decode("ascii") + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
