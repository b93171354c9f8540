"""
A private network for a test: its own loopback, its own ``/etc/hosts``.

The tutorials and the Compose stack name fixed ports (8000, 11434, 9090,
6379) and host names (``gpu-1.lan``, ``redis``, ``ollama``).  Rather than
rewrite them, a test runs them in a network namespace of its own (and a
mount namespace, for a private ``/etc/hosts``), where those ports are free
and those names resolve to loopback addresses: what the page or the
Compose file says is what runs.  Nothing leaves the namespace: it has
only its loopback interface.

A sleeping process holds the namespaces; every command of the test is
started inside them with ``nsenter``.  The file system is shared, so
files written inside are seen outside, and coverage data is saved as usual.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

#: The programs the namespace needs (util-linux and iproute2).
TOOLS = ("unshare", "nsenter", "ip", "mount")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_or_skip(programs: Sequence[str], why: str) -> None:
    """
    Skip (outside CI) or fail (in CI, which installs them) when a program is missing.
    """
    missing = [p for p in programs if shutil.which(p) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed: {why}"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


class Namespace:
    """Network and mount namespaces held open by a sleeping process."""

    def __init__(self, workdir: Path, hosts: Mapping[str, str] | None = None) -> None:
        missing_or_skip(TOOLS, "a private network namespace needs them")
        self.workdir = workdir
        self.hosts_file = workdir / "etc-hosts"
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{address} {name}" for name, address in (hosts or {}).items()]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        script = (
            "ip link set lo up && "
            f"mount --bind {self.hosts_file} /etc/hosts && "
            "echo ready && exec sleep 86400"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.holder.stdout is not None
        first = self.holder.stdout.readline().decode().strip()
        if first != "ready":
            rest = self.holder.stdout.read().decode() if self.holder.poll() is not None else ""
            self.holder.kill()
            message = f"no network namespace here: {first} {rest}".strip()
            if in_ci():
                pytest.fail(message)
            pytest.skip(message)
        self.processes: list[subprocess.Popen[bytes]] = []

    def command(self, argv: Sequence[str], cwd: Path | None = None) -> list[str]:
        """``argv`` as run inside the namespaces, in ``cwd``."""
        return [
            "nsenter",
            f"--target={self.holder.pid}",
            "--net",
            "--mount",
            f"--wd={cwd or self.workdir}",
            "--",
            *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 120,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv, cwd),
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input.decode() if input is not None else None,
        )

    def start(
        self,
        argv: Sequence[str],
        *,
        log: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A long-running process in its own process group, output to ``log``."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                self.command(argv, cwd),
                env=dict(env) if env is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def wait_for_port(
        self,
        port: int,
        address: str = "127.0.0.1",
        *,
        process: subprocess.Popen[bytes] | None = None,
        log: Path | None = None,
        seconds: float = 60,
    ) -> None:
        """Until something accepts connections on ``address:port`` inside."""
        probe = f"exec 3<>/dev/tcp/{address}/{port}"
        deadline = time.monotonic() + seconds
        while True:
            if process is not None and process.poll() is not None:
                output = log.read_text() if log is not None else ""
                raise AssertionError(
                    f"exited with {process.returncode} before listening on {port}:\n{output}"
                )
            if self.run(["bash", "-c", probe], timeout=30).returncode == 0:
                return
            if time.monotonic() > deadline:
                output = log.read_text() if log is not None else ""
                raise AssertionError(f"nothing listened on {address}:{port}:\n{output}")
            time.sleep(0.2)

    def stop(self, process: subprocess.Popen[bytes], seconds: float = 30) -> None:
        """SIGTERM to the process's group (a shell and what it started), then SIGKILL."""
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, 15)
        except ProcessLookupError:
            return
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)
        self.holder.kill()
        self.holder.wait()
