"""
End-to-end fixtures: the real daemon and the fake Ollama as ``twistd`` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TWISTD = shutil.which("twistd") or str(Path(sys.executable).parent / "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: object, seconds: float = 15.0) -> None:
    """
    Poll ``condition`` until it is true.

    A daemon's log lines and metrics are written after its answers leave (a
    worker's log even goes through the master), so a test that has its
    answer waits for them.
    """
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"process exited with {process.returncode}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listened on port {port} within {timeout}s")


@dataclass
class Daemon:
    """A running ``twistd -n`` process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_twistd(
    args: list[str],
    port: int,
    workdir: Path,
    name: str,
    env: dict[str, str] | None = None,
    *,
    log_to_stdout: bool = False,
) -> Daemon:
    """
    ``twistd -n`` logging to ``name.log``: through ``--logfile``, or with
    ``log_to_stdout`` as the systemd unit runs it (``--logfile=-``, standard
    output appended to the file).
    """
    log = workdir / f"{name}.log"
    environment = {**os.environ, **(env or {})}
    if log_to_stdout:
        command = [TWISTD, "-n", "--pidfile=", "--logfile=-", *args]
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=environment
            )
    else:
        command = [TWISTD, "-n", "--pidfile=", f"--logfile={log}", *args]
        process = subprocess.Popen(
            command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment
        )
    wait_for_port(port, process)
    return Daemon(process=process, port=port, log=log)


@pytest.fixture(scope="module", autouse=True)
def private_state_per_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """
    The daemons of a module share a state store of their own: a backend
    one module's daemon found broken must not be out for the next module's.
    """
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state-home"))
    yield
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def fake_ollama_process(workdir: Path) -> Iterator[Daemon]:
    port = free_port()
    daemon = start_twistd(
        ["oproxy-fake-ollama", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        port,
        workdir,
        "fake-ollama",
    )
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def oproxy_process(workdir: Path, fake_ollama_process: Daemon) -> Iterator[Daemon]:
    port = free_port()
    config = workdir / "oproxy.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends:
  - {{name: local, type: ollama, url: "{fake_ollama_process.url}"}}
auth:
  keys:
    - {{name: e2e, key: "${{E2E_KEY}}"}}
"""
    )
    daemon = start_twistd(
        ["oproxy", "--config", str(config)], port, workdir, "oproxy", {"E2E_KEY": "sk-e2e-secret"}
    )
    yield daemon
    daemon.stop()
    assert "sk-e2e-secret" not in daemon.log.read_text()


def fake_stats(fake: Daemon) -> dict[str, int]:
    with urllib.request.urlopen(f"{fake.url}/_fake/stats", timeout=5) as response:
        stats: dict[str, int] = json.loads(response.read())
        return stats


def reset_fake(fake: Daemon) -> None:
    request = urllib.request.Request(f"{fake.url}/_fake/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=5):
        pass
