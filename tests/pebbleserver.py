"""
A real ACME server for the tests: Let's Encrypt's ``pebble``, with
``pebble-challtestsrv`` as its DNS server (every name is 127.0.0.1).

Both come from Debian's ``pebble`` package.  Without them the tests that
need them are skipped, except under CI (``CI`` set), where a missing
server is a failure rather than a silent gap.

Pebble serves its API over HTTPS with a certificate it is given: the
harness makes one for 127.0.0.1 with ``cryptography``.  Its CA (root and
intermediate) is new at every start; ``root()`` fetches the root from its
management API, for clients to trust.  ``PEBBLE_VA_NOSLEEP`` and
``PEBBLE_WFE_NONCEREJECT=0`` take out the delays and nonce rejections it
adds to shake clients; ``PEBBLE_AUTHZREUSE=0`` makes every order prove
every name again.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.certificates import self_signed
from tests.redisserver import free_port

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")


def pebble_or_skip() -> None:
    if PEBBLE and CHALLTESTSRV:
        return
    if os.environ.get("CI"):
        pytest.fail("pebble is not installed (Debian's pebble package)")
    pytest.skip("pebble is not installed (apt-get install pebble)")


def api_certificate(directory: Path) -> tuple[Path, Path]:
    """Pebble's own HTTPS certificate, for 127.0.0.1 and localhost."""
    cert_path, key_path = directory / "pebble-api.pem", directory / "pebble-api-key.pem"
    self_signed(cert_path, key_path, "pebble test API")
    return cert_path, key_path


class Pebble:
    """
    ``pebble`` and its DNS on free loopback ports.

    :param http_port: where pebble validates HTTP-01 (the daemon's ``http01``).
    :param validity: seconds each certificate it issues is valid.
    """

    def __init__(self, directory: Path, http_port: int, validity: int) -> None:
        self.directory = directory
        self.http_port = http_port
        self.validity = validity
        self.acme_port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        self.api_certificate, self._api_key = api_certificate(directory)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.api_certificate))

    def start(self) -> None:
        assert PEBBLE and CHALLTESTSRV
        config = self.directory / "pebble.json"
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.acme_port}",
                        "managementListenAddress": f"127.0.0.1:{self.management_port}",
                        "certificate": str(self.api_certificate),
                        "privateKey": str(self._api_key),
                        "httpPort": self.http_port,
                        "tlsPort": free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                        "certificateValidityPeriod": self.validity,
                    }
                }
            )
        )
        log = open(self.directory / "pebble.log", "ab")  # noqa: SIM115 - the processes keep it
        self.processes.append(
            subprocess.Popen(
                [
                    CHALLTESTSRV,
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-dns01",
                    f"127.0.0.1:{self.dns_port}",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    f"127.0.0.1:{self.dns_management_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        environment = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
        }
        self.processes.append(
            subprocess.Popen(
                [PEBBLE, "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise AssertionError(f"pebble exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.directory_url, context=self._context(), timeout=2):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"pebble did not start:\n{self.log()}")

    def log(self) -> str:
        path = self.directory / "pebble.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def root(self) -> bytes:
        """Pebble's root CA (new at every start), for clients to trust."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._context(), timeout=5) as response:
            root: bytes = response.read()
            return root

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []
