"""
Processes: everything the harness starts goes through :class:`Processes`, so
it can all be stopped; and what the harness reads about processes and the
machine from ``/proc`` (process trees, VmRSS, CPU time), pinning to cores
included.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .common import LOOPBACK, BenchError, log

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("latin-1")
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces.
    return stat[stat.rfind(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, found through the ppid in /proc/*/stat."""
    children = _children_map()
    tree: list[int] = []
    todo = [pid]
    while todo and len(tree) < 10000:
        current = todo.pop()
        if current in tree:
            continue
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def is_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def rss_kib(pid: int) -> int | None:
    """VmRSS of one process in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="latin-1") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes, in clock ticks (gone ones count 0)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total


def machine_ticks() -> tuple[int, int]:
    """(all ticks, busy ticks) of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]), sum(values[:8]) - idle


def cpu_busy_pct(seconds: float = 1.0) -> float:
    """How busy the CPUs are (all processes, this machine), sampled over ``seconds``."""
    total0, busy0 = machine_ticks()
    time.sleep(seconds)
    total1, busy1 = machine_ticks()
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def wait_for_quiet(limit: float, threshold_pct: float = 10.0) -> None:
    """
    On a shared machine, wait (at most ``limit`` seconds) until the CPUs are
    nearly idle before a measurement; the harness itself is idle meanwhile.
    """
    if limit <= 0:
        return
    deadline = time.monotonic() + limit
    busy = cpu_busy_pct()
    while busy > threshold_pct and time.monotonic() < deadline:
        log(f"  waiting for other work to finish ({busy:.0f}% CPU busy)")
        time.sleep(min(4.0, max(0.0, deadline - time.monotonic())))
        busy = cpu_busy_pct()


@contextlib.contextmanager
def pinned(server_pid: int | None, load_pids: list[int], enabled: bool) -> Iterator[str | None]:
    """
    While measuring latency, keep the server under test on CPU 0 and the
    load (wrk, the upstream, this script) on CPU 1.

    On two cores shared by everything, a latency percentile otherwise
    measures who the scheduler ran first as much as the server itself; the
    direct baseline is measured the same way, so the difference stays fair.
    Yields the CPU list for the load generator that starts meanwhile
    (``taskset -c`` syntax), or None when nothing is pinned.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        yield None
        return
    server, load = {cpus[0]}, {cpus[1]}
    moved: list[int] = []

    def move(pids: list[int], where: set[int]) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, where)
                moved.append(pid)

    if server_pid is not None:
        move(process_tree(server_pid), server)
    for pid in load_pids:
        move(process_tree(pid), load)
    move([os.getpid()], load)
    try:
        yield ",".join(str(c) for c in sorted(load))
    finally:
        for pid in moved:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, set(cpus))


class CpuMeter:
    """
    Where the CPU went during one measurement: the server under test
    (``server_pids`` and their children), everything this harness ran
    (nginx, the proxy, wrk, itself), and the rest of the machine -- other
    work that would make the numbers pessimistic.  In cores (1.0 = one CPU
    busy for the whole time).
    """

    def __init__(self, server_pids: list[int], other_pids: list[int]) -> None:
        self.server = [p for root in server_pids for p in process_tree(root)]
        self.other = [p for root in other_pids for p in process_tree(root) if p not in self.server]
        self.result: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self.started = time.monotonic()
        self.server0 = cpu_ticks(self.server)
        self.other0 = cpu_ticks(self.other)
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.machine0 = machine_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = max(1e-6, time.monotonic() - self.started)
        machine1 = machine_ticks()
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        server = (cpu_ticks(self.server) - self.server0) / CLOCK_TICKS
        rusage = (
            children1.ru_utime
            + children1.ru_stime
            - self.children0.ru_utime
            - self.children0.ru_stime
            + self1.ru_utime
            + self1.ru_stime
            - self.self0.ru_utime
            - self.self0.ru_stime
        )
        ours = server + (cpu_ticks(self.other) - self.other0) / CLOCK_TICKS + rusage
        busy = (machine1[1] - self.machine0[1]) / CLOCK_TICKS
        self.result = {
            "server_cores": round(server / seconds, 3),
            "harness_cores": round(ours / seconds, 3),
            "machine_busy_cores": round(busy / seconds, 3),
            "foreign_cores": round(max(0.0, busy - ours) / seconds, 3),
        }


class Processes:
    """
    The processes this run started.  Each is the leader of its own session
    (so a Ctrl-C in the terminal reaches only this script, which then stops
    them in order); :meth:`stop` kills the whole tree of one, children that
    left the group included.
    """

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: list[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv``, its output (both streams) appended to ``log_path``."""
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
                env=env,
            )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if process in self.running:
            self.running.remove(process)
        tree = process_tree(process.pid) if process.poll() is None else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, sig)
            for pid in tree:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if process.poll() is not None and not any(is_alive(p) for p in tree[1:]):
                    return
                time.sleep(0.05)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            log(f"warning: process {process.pid} did not exit after SIGKILL")

    def stop_all(self) -> None:
        for process in reversed(list(self.running)):
            self.stop(process)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> None:
    """Wait until ``process`` listens on ``port``; say why not if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(
                f"{process.args!r} exited with {process.returncode} before listening:\n"
                + tail(log_path)
            )
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listened on port {port} within {timeout:.0f}s:\n" + tail(log_path))


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log, indented, for an error message."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return "\n".join("    " + line for line in text[-lines:])
