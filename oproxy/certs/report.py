"""
What the daemon says about its certificates: in ``/v1/health``, in
``/metrics`` and to ``oproxy certs status``.

Everything here is computed from the files (the certificate directory and
the renewal service's status file), never from one process's memory, so
every worker says the same thing, whichever one a scrape or a health
check reaches.  The files are read again only when they change (a ``stat``
each otherwise): a few small local files, read in the reactor's thread by
a health check or a scrape, neither of which is on the request path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from oproxy.certs.files import Held, pem_files, read_directory

#: The status file, in the state directory.
STATUS_FILE = "certificates-status.json"

EXPIRY_METRIC = "oproxy_certificate_expiry_seconds"


def status_path(state_directory: str) -> str:
    return os.path.join(state_directory, STATUS_FILE)


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class CertificateReport:
    """
    The certificate directory and the status file, read when they change.

    :param status_file: the renewal service's status file (``None``: no
        service makes certificates here).
    """

    def __init__(self, directory: str, status_file: str | None) -> None:
        self.directory = directory
        self.status_file = status_file
        self._held_stamps: dict[str, tuple[int, int, int] | None] | None = None
        self._held: list[Held] = []
        self._problems: list[str] = []
        self._status_stamp: tuple[int, int, int] | None = None
        self._status: dict[str, Any] = {}

    def held(self) -> list[Held]:
        """The certificates in the directory (with their keys)."""
        stamps = {path: _stamp(path) for path in pem_files(self.directory)}
        if stamps != self._held_stamps:
            self._held_stamps = stamps
            self._held, self._problems = read_directory(self.directory)
        return self._held

    def status(self) -> dict[str, Any]:
        """The status file's contents: each renewal job's state."""
        if self.status_file is None:
            return {}
        stamp = _stamp(self.status_file)
        if stamp != self._status_stamp:
            self._status_stamp = stamp
            try:
                with open(self.status_file, encoding="utf-8") as f:
                    found = json.load(f)
                self._status = found if isinstance(found, dict) else {}
            except (OSError, ValueError):
                self._status = {}
        return self._status

    def health(self, now: float) -> dict[str, Any]:
        """
        The ``certificates`` part of ``/v1/health``, and whether it makes
        the daemon ``degraded``: a renewal failing, or a certificate expired.
        """
        held = self.held()
        status = self.status()
        certificates = [each.to_json(now) for each in held]
        document: dict[str, Any] = {"served": certificates}
        if self._problems:
            document["unreadable"] = list(self._problems)
        for kind in ("acme", "local"):
            if kind in status:
                document[kind] = status[kind]
        failing = [k for k in ("acme", "local") if status.get(k, {}).get("state") == "failing"]
        expired = [", ".join(each.names) for each in held if each.not_after <= now]
        problems = [f"{kind} renewal failing: {status[kind].get('error')}" for kind in failing]
        problems += [f"certificate for {names} has expired" for names in expired]
        document["status"] = "degraded" if problems else "ok"
        if problems:
            document["problems"] = problems
        return document

    def expiries(self) -> dict[str, float]:
        """Each name's expiry (Unix seconds): of the certificate that serves it."""
        found: dict[str, float] = {}
        for each in self.held():
            for name in each.names:
                found[name] = max(found.get(name, 0.0), each.not_after)
        return found

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The Prometheus collector's side: one gauge, a sample per name."""
        gauge = GaugeMetricFamily(
            EXPIRY_METRIC,
            "When the certificate serving each name expires (Unix time, seconds); "
            "alert on it minus time() being small.",
            labels=["name"],
        )
        for name, expiry in sorted(self.expiries().items()):
            gauge.add_metric([name], expiry)
        yield gauge
