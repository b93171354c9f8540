"""
The master side of multi-process serving: spawn, supervise, drain, join.

The master binds every listener once (with privileges, if it has any), then
starts ``N`` worker processes (``python -m oproxy.worker``) that inherit the
listening sockets, and a private directory for their metrics.  A worker
that dies is restarted with exponential backoff.  On stop the master sends
``SIGTERM`` to every worker (each stops accepting and drains), waits up to
the drain deadline plus a grace period, and kills what is left.  ``SIGHUP``
is passed on, so each worker reloads its configuration; so is a change of
the config file, which only the master watches (:mod:`oproxy.watch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client.multiprocess import mark_process_dead
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from oproxy.announce import log_listeners
from oproxy.listeners import Listener, bind
from oproxy.metrics import MULTIPROCESS_ENV
from oproxy.service import bound

log = Logger()

#: First restart delay after a crash, doubled on each quick crash.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: A worker that lived this long is healthy: its next crash restarts quickly.
STABLE_AFTER = 30.0
#: How long after the drain deadline a worker may take to exit before SIGKILL.
KILL_GRACE = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """
    What a worker needs to build the same service as the master would.

    :ivar listeners: ``(fd in the child, endpoint description)`` pairs.
    :ivar log_fd: when the master logs plain lines to its standard output,
        the child's descriptor for that same output, on which the worker
        writes its own lines; ``None``: the master relays them.
    """

    config_path: str | None
    listen: tuple[str, ...]
    backend_url: str | None
    listeners: tuple[tuple[int, str], ...]
    log_fd: int | None = None

    def to_environment(self, index: int, *, announce_backends: bool = False) -> str:
        """
        :param announce_backends: whether this worker logs how the backends
            answered its first probe: one worker does, once, so that a daemon
            with N workers says it once.
        """
        return json.dumps(
            {
                "index": index,
                "announce_backends": announce_backends,
                "config": self.config_path,
                "listen": list(self.listen),
                "backend": self.backend_url,
                "listeners": [list(pair) for pair in self.listeners],
                "log_fd": self.log_fd,
            }
        )


#: The line a worker prints once it serves and handles its signals.
READY = b"oproxy-worker-ready"


class _WorkerProtocol(ProcessProtocol):
    """Relays a worker's output to the master's log and reports its end."""

    def __init__(self, index: int, ended: Callable[[int, Failure], None]) -> None:
        self.index = index
        self.ready = False
        self._ended = ended
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            if line == READY:
                self.ready = True
                pid = self.transport.pid if self.transport is not None else None
                log.info("Worker {index} serving (pid {pid})", index=self.index, pid=pid)
            elif line.strip():
                log.info(
                    "worker {index}: {line}",
                    index=self.index,
                    line=line.decode("utf-8", "replace"),
                )

    def processEnded(self, reason: Failure) -> None:
        self._ended(self.index, reason)


def metrics_directory() -> str:
    """
    A private metrics directory per daemon instance: new at every start, so
    no sample of an earlier run is ever added in.
    """
    return tempfile.mkdtemp(prefix="oproxy-metrics-")


class WorkerPool(service.Service):
    """
    Bind the listeners; keep ``count`` workers alive while running; stop
    them gracefully, then close the listeners and remove the metrics.

    :param bind: binds one endpoint description for ``count`` workers
        (:func:`oproxy.listeners.bind`).
    :param make_metrics_directory: makes the directory the workers' metrics
        are shared in, at start; it is removed at stop.  ``None``: workers
        keep their metrics to themselves.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        spec: WorkerSpec,
        drain_timeout: Callable[[], float],
        executable: str = sys.executable,
        *,
        bind: Callable[[Any, str, int], Listener] = bind,
        make_metrics_directory: Callable[[], str] | None = metrics_directory,
        environment: dict[str, str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._count = count
        self._spec = spec
        self._bind = bind
        # Holding the sockets keeps them open for the children, and keeps
        # the connections queued on a dead worker's socket for its successor.
        self.listeners: tuple[Listener, ...] = ()
        self._drain_timeout = drain_timeout
        self._executable = executable
        self._environment = dict(environment or {})
        self._make_metrics_directory = make_metrics_directory
        self.metrics_directory: str | None = None
        self._processes: dict[int, Any] = {}
        self._started_at: dict[int, float] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._stopping = False
        self._all_gone: defer.Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        """
        Bind every listener, before ``twistd`` drops privileges.

        :raises CannotServe: an address cannot be bound.
        """
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self.listeners = tuple(
            bound(partial(self._bind, self._reactor, description, self._count))
            for _, description in self._spec.listeners
        )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._make_metrics_directory is not None:
            self.metrics_directory = self._make_metrics_directory()
            self._environment[MULTIPROCESS_ENV] = self.metrics_directory
        # Said here, once, rather than by every worker.
        addresses = [(each.description, each.sockets[0].getsockname()) for each in self.listeners]
        log_listeners(addresses, self._count)
        for index in range(self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for (target, _), listener in zip(self._spec.listeners, self.listeners, strict=True):
            child_fds[target] = listener.fileno_for(index)
        if self._spec.log_fd is not None:
            # Descriptor 1 itself: twistd has put a logging file-like object
            # in sys.stdout, which has no descriptor.
            child_fds[self._spec.log_fd] = 1
        environment = {**os.environ, **self._environment}
        first_start = index not in self._started_at
        environment["OPROXY_WORKER"] = self._spec.to_environment(
            index, announce_backends=index == 0 and first_start
        )
        process = self._reactor.spawnProcess(
            _WorkerProtocol(index, self._ended),
            self._executable,
            [self._executable, "-m", "oproxy.worker"],
            env=environment,
            childFDs=child_fds,
        )
        self._processes[index] = process
        self._started_at[index] = self._reactor.seconds()
        log.info("Started worker {index} (pid {pid})", index=index, pid=process.pid)

    def _ended(self, index: int, reason: Failure) -> None:
        process = self._processes.pop(index, None)
        if process is not None and self.metrics_directory is not None:
            # Its live gauges (in-flight requests) must stop counting.
            mark_process_dead(process.pid, self.metrics_directory)
        if self._stopping:
            if not self._processes and self._all_gone is not None:
                self._all_gone.callback(None)
            return
        lived = self._reactor.seconds() - self._started_at.get(index, 0.0)
        delay = (
            RESTART_DELAY
            if lived >= STABLE_AFTER
            else min(self._delays.get(index, RESTART_DELAY / 2) * 2, MAX_RESTART_DELAY)
        )
        self._delays[index] = delay
        log.warn(
            "Worker {index} ended ({reason}); restarting in {delay:g}s",
            index=index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[index] = self._reactor.callLater(delay, self._spawn, index)

    def signal_all(self, signum: int, *, ready_only: bool = False) -> None:
        for process in list(self._processes.values()):
            if ready_only and not process.proto.ready:
                continue
            with contextlib.suppress(error.ProcessExitedAlready, OSError):
                process.signalProcess(signum)

    def reload(self) -> None:
        """
        Ask every worker to reload its configuration (``SIGHUP``): on a
        ``SIGHUP`` to the master, and when the master sees the file change.
        """
        # A worker still starting reads the file anyway, and has no SIGHUP
        # handler yet: the signal's default action would kill it.
        log.info("Reloading configuration in {count} worker(s)", count=len(self._processes))
        self.signal_all(signal.SIGHUP, ready_only=True)

    async def _stop(self) -> None:
        self._stopping = True
        for pending in self._restarts.values():
            if pending.active():
                pending.cancel()
        self._restarts.clear()
        # Close the master's copies of the listening sockets: once the
        # workers close theirs, the kernel refuses new connections instead
        # of queueing them for nobody.
        for listener in self.listeners:
            listener.close()
        if not self._processes:
            return
        self._all_gone = defer.Deferred()
        self.signal_all(signal.SIGTERM)
        deadline = self._drain_timeout() + KILL_GRACE
        killer = self._reactor.callLater(deadline, self.signal_all, signal.SIGKILL)
        await self._all_gone
        if killer.active():
            killer.cancel()

    def _remove_metrics(self) -> None:
        directory, self.metrics_directory = self.metrics_directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return defer.Deferred.fromCoroutine(self._stop_and_clean())

    async def _stop_and_clean(self) -> None:
        try:
            await self._stop()
        finally:
            self._remove_metrics()
