"""
oproxy as a real daemon, started the way the systemd unit starts it, with a
generated configuration per target.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .common import LOOPBACK, BenchError
from .processes import Processes, free_port, is_alive, process_tree, tail, wait_for_port


def twistd_path() -> str:
    """The ``twistd`` of this Python (a virtualenv's), else the first on the PATH."""
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if not found:
        raise BenchError("twistd not found: pip install -e . in the repository first")
    return found


@dataclass
class Proxy:
    """One running daemon: where it listens, its process, its log and configuration."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path

    def serving_pids(self) -> list[int]:
        """The daemon and its live children: the processes that serve."""
        return [p for p in process_tree(self.process.pid) if is_alive(p)]


def start_proxy(
    procs: Processes,
    workdir: Path,
    name: str,
    upstream_port: int,
    *,
    workers: int,
    cache: bool | None,
) -> Proxy:
    """
    ``twistd -n --pidfile= --logfile=- oproxy --config FILE``, its standard
    output appended to a file: the way the systemd unit runs it (there, into
    the journal), a line per request included.

    ``cache`` None leaves the cache section out (the daemon's default).
    """
    port = free_port()
    config_path = workdir / f"oproxy-{name}.yaml"
    lines = [
        f"# oproxy benchmark configuration ({name})",
        f'listen: ["tcp:{port}:interface={LOOPBACK}"]',
        "backends:",
        f'  - {{name: bench, type: ollama, url: "http://{LOOPBACK}:{upstream_port}"}}',
        f"workers: {workers}",
    ]
    if cache is not None:
        lines.append(f"cache: {{enabled: {'true' if cache else 'false'}}}")
    config_path.write_text("\n".join(lines) + "\n")
    log_path = workdir / f"oproxy-{name}.log"
    argv = [
        twistd_path(),
        "-n",
        "--pidfile=",
        "--logfile=-",
        "oproxy",
        "--config",
        str(config_path),
    ]
    process = procs.start(argv, log_path=log_path, cwd=workdir)
    try:
        wait_for_port(port, process, log_path, 30)
    except BenchError as e:
        procs.stop(process)
        raise BenchError(f"{e}\n  daemon log:\n{tail(log_path)}") from None
    return Proxy(name, port, process, log_path, config_path)
