"""
The service that keeps each certificate fresh.

One loop per source of certificates (ACME, the local CA): look at the
certificate held now; if there is none, or less than a third of its
lifetime is left, obtain a new one; else sleep until then.  A failure
leaves the file as it was (the old certificate keeps serving) and is tried
again after a delay that grows with each failure in a row
(:mod:`oproxy.certs.schedule`); a new certificate that is due for renewal
the moment it arrives counts as a failure too, so no clock or CA can make
the loop issue certificate after certificate.

What touches the disk or the network (reading the file, the ACME client,
making keys) runs in a thread, never in the reactor's.  The outcome of each
loop is written to a status file beside the state store, which every
process (workers included) reads for ``/v1/health``; it is only written by
the one process that runs this service.

Stopping cancels the sleeps, tells a job in its thread to stop at its next
step, and waits for it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, TypeVar

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oproxy.certs.files import PUBLIC_FILE, Held, iso, make_directory, write_atomically
from oproxy.certs.schedule import renewal_time, retry_delay, sleep_until

log = Logger()

T = TypeVar("T")

#: Runs a blocking call in a thread: ``run(f, *args)`` fires with its result.
RunBlocking = Callable[..., defer.Deferred[Any]]


class Stopped(Exception):
    """The service is stopping: the job gave up between two steps."""


class Job(Protocol):
    """
    One source of certificates, for one set of names.  Its methods block:
    the service calls them in a thread.
    """

    #: ``acme`` or ``local``: the key in the status file.
    kind: str
    names: tuple[str, ...]

    def current(self) -> Held | None:
        """The certificate held now for exactly these names, from this source."""

    def obtain(self, stopping: threading.Event) -> Held:
        """
        Obtain a certificate and write it; raise :class:`Stopped` once
        ``stopping`` is set, any other exception when it fails.
        """

    def explain(self, error: Exception) -> str:
        """One line saying why ``error`` happened, for the log and health."""


@dataclass(frozen=True)
class JobStatus:
    """
    How one source is doing, as the status file (and ``/v1/health``) says.

    :ivar state: ``pending`` (no outcome yet), ``ok`` or ``failing``.
    :ivar error: why the last attempt failed, while failing.
    """

    names: tuple[str, ...]
    state: str = "pending"
    file: str | None = None
    not_after: str | None = None
    renew_at: str | None = None
    failures: int = 0
    error: str | None = None
    last_attempt: str | None = None
    last_success: str | None = None
    next_attempt: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["names"] = list(self.names)
        found.update(found.pop("extra"))
        return found


def _held_fields(held: Held) -> dict[str, Any]:
    return {
        "file": os.path.basename(held.path),
        "not_after": iso(held.not_after),
        "renew_at": iso(renewal_time(held.not_before, held.not_after)),
    }


class CertificateService(service.Service):
    """
    Keeps every job's certificate fresh while running.

    :param run_blocking: runs a blocking call in a thread (the reactor's
        pool in the daemon; at once, in tests on a ``task.Clock``).
    :param status_path: the status file (``None``: not written).
    :param extra: per job kind, fields shown with its status (the ACME
        directory URL).
    :param note: said once at start (a directory no listener serves).
    """

    def __init__(
        self,
        clock: IReactorTime,
        jobs: list[Job],
        run_blocking: RunBlocking,
        status_path: str | None,
        extra: dict[str, dict[str, str]] | None = None,
        note: str | None = None,
    ) -> None:
        self._clock = clock
        self._note = note
        self.jobs = jobs
        self._run = run_blocking
        self._status_path = status_path
        self.statuses: dict[str, JobStatus] = {
            job.kind: JobStatus(names=job.names, extra=dict((extra or {}).get(job.kind, {})))
            for job in jobs
        }
        self._stopping = threading.Event()
        self._sleeps: set[defer.Deferred[None]] = set()
        self._loops: list[defer.Deferred[None]] = []
        self._status_lock = defer.DeferredLock()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping.clear()
        if self._note is not None:
            log.warn("Certificates: {note}", note=self._note)
        self._publish()
        for job in self.jobs:
            loop = defer.Deferred.fromCoroutine(self._keep(job))
            loop.addErrback(lambda failure: log.failure("Certificate renewal stopped", failure))
            self._loops.append(loop)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping.set()
        for sleep in list(self._sleeps):
            sleep.cancel()
        return defer.Deferred.fromCoroutine(self._stopped())

    async def _stopped(self) -> None:
        loops, self._loops = self._loops, []
        await defer.DeferredList(loops)
        # The last status write, if one is under way.
        await self._status_lock.acquire()
        self._status_lock.release()

    async def _keep(self, job: Job) -> None:
        """Keep ``job``'s certificate fresh until the service stops."""
        failures = 0
        while not self._stopping.is_set():
            held = await self._current(job)
            now = self._clock.seconds()
            if held is not None and renewal_time(held.not_before, held.not_after) > now:
                failures = 0
                due = self._fresh(job, held)
                await self._sleep(sleep_until(due, now))
                continue
            try:
                await self._renew(job)
            except Stopped:
                return
            except Exception as e:
                if self._stopping.is_set():
                    return
                failures += 1
                await self._sleep(self._failed(job, held, failures, e))
            else:
                failures = 0

    async def _current(self, job: Job) -> Held | None:
        """The certificate held now; one that cannot be read is none."""
        try:
            held: Held | None = await self._run(job.current)
        except Exception as e:
            log.warn(
                "Cannot read the certificate for {names}: {problem}",
                names=", ".join(job.names),
                problem=str(e),
            )
            return None
        return held

    def _fresh(self, job: Job, held: Held) -> float:
        """Say that ``held`` is good; when it is due for renewal."""
        due = renewal_time(held.not_before, held.not_after)
        self._update(
            job, state="ok", failures=0, error=None, next_attempt=iso(due), **_held_fields(held)
        )
        return due

    async def _renew(self, job: Job) -> None:
        """
        Obtain a certificate in a thread.

        :raises Exception: it failed, or the new certificate is already due
            for renewal (which would otherwise be renewed at once, again and
            again).
        """
        self._update(job, last_attempt=iso(self._clock.seconds()))
        held: Held = await self._run(job.obtain, self._stopping)
        now = self._clock.seconds()
        due = renewal_time(held.not_before, held.not_after)
        if due <= now:
            raise ValueError(
                f"the new certificate (valid until {iso(held.not_after)}) is already "
                "due for renewal: is this host's clock right?"
            )
        self._update(job, last_success=iso(now))
        self._fresh(job, held)
        log.info(
            "Obtained a certificate for {names} ({kind}), valid until {not_after}; "
            "renewing it from {renew_at}",
            names=", ".join(job.names),
            kind=job.kind,
            not_after=iso(held.not_after),
            renew_at=iso(due),
        )

    def _failed(self, job: Job, held: Held | None, failures: int, error: Exception) -> float:
        """Say why the attempt failed; how long to wait before the next."""
        delay = retry_delay(failures)
        why = job.explain(error)
        self._update(
            job,
            state="failing",
            failures=failures,
            error=why,
            next_attempt=iso(self._clock.seconds() + delay),
        )
        log.warn(
            "Could not obtain a certificate for {names}: {error}; "
            "trying again in {delay:g} s ({served})",
            names=", ".join(job.names),
            error=why,
            delay=delay,
            served="the current certificate keeps serving"
            if held is not None
            else "no certificate to serve yet",
        )
        return delay

    async def _sleep(self, seconds: float) -> None:
        if self._stopping.is_set():
            return
        sleep = task.deferLater(self._clock, seconds, lambda: None)
        self._sleeps.add(sleep)
        try:
            await sleep
        except defer.CancelledError:
            pass
        finally:
            self._sleeps.discard(sleep)

    def _update(self, job: Job, **changes: Any) -> None:
        self.statuses[job.kind] = replace(self.statuses[job.kind], **changes)
        self._publish()

    def _publish(self) -> None:
        """Write the statuses as they are now, one write after another."""
        if self._status_path is None:
            return
        path = self._status_path
        data = json.dumps(
            {kind: status.to_json() for kind, status in self.statuses.items()}, indent=2
        ).encode()
        written = self._status_lock.run(self._run, write_status, path, data)
        written.addErrback(
            lambda failure: log.warn(
                "Cannot write {path}: {problem}", path=path, problem=failure.getErrorMessage()
            )
        )


def write_status(path: str, data: bytes) -> None:
    """The status file: no secret in it, so anyone who may read the directory may read it."""
    make_directory(os.path.dirname(path))
    write_atomically(path, data, PUBLIC_FILE)
