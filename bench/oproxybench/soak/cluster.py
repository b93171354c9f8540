"""
The processes under soak: two fake Ollamas, the daemon and its workers, and
the ``oproxy keys`` command line, all run from this checkout (``PYTHONPATH``
names it, so an installed oproxy elsewhere is not what gets soaked).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import BENCH_DIR, LOOPBACK, BenchError, log
from ..daemon import twistd_path
from ..processes import Processes, free_port, is_alive, rss_kib, tail, wait_for_port
from .plan import SoakSettings

REPO = BENCH_DIR.parent
#: Far above anything a soak uses: the quotas are there to be counted.
QUOTA = 10**12
#: How long the daemon may take to drain after SIGTERM, beyond ``drain_timeout`` (30 s).
EXIT_GRACE = 45.0

_ERRORS = re.compile(r"#(error|critical)\]|Traceback|Unhandled")
_WARNING = re.compile(r"#warn\] (?:worker \d+: \[[^\]]*\] )?(.*)")
_RELOADED = re.compile(r"worker (\d+): .*Configuration reloaded")
_CHANGED = re.compile(r"Configuration file .* changed; reloading")
_SERVING = re.compile(r"Worker (\d+) serving \(pid (\d+)\)")


@dataclass
class Fake:
    """One fake Ollama: its port stays, its process comes and goes."""

    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    #: The stats file of each life, in order.
    lives: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@dataclass(frozen=True)
class ProcessSample:
    """
    One process at one moment: resident memory and open descriptors, the
    latter also by kind (see :func:`descriptor_kinds`).
    """

    pid: int
    rss_kib: int | None
    fds: int | None
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def fds_besides_pool(self) -> int | None:
        """Descriptors other than connections to the backends, which the pool keeps."""
        if self.fds is None:
            return None
        return self.fds - self.kinds.get("to backends", 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "rss_kib": self.rss_kib,
            "fds": self.fds,
            "fds_besides_pool": self.fds_besides_pool,
            "kinds": self.kinds,
        }


def open_descriptors(pid: int) -> int | None:
    """How many descriptors ``pid`` has open, or None when it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _port(address: str) -> int:
    """The port of an address of ``/proc/net/tcp`` (``0100007F:1F90``)."""
    return int(address.rsplit(":", 1)[1], 16)


def _tcp_sockets() -> dict[str, tuple[int, int, str]]:
    """Every TCP socket of the machine by inode: (local port, remote port, state)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                found[inode] = (
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    state,
                )
    return found


def descriptor_kinds(pid: int, listen_port: int, backend_ports: set[int]) -> dict[str, int]:
    """
    What ``pid``'s descriptors are: ``listening``, ``clients`` (accepted
    connections), ``to backends`` (upstream connections, busy or pooled),
    ``other sockets``, ``pipes``, ``files`` and ``other``.
    """
    sockets = _tcp_sockets()
    kinds: Counter[str] = Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            local, remote, state = sockets.get(target[8:-1], (0, 0, ""))
            if state == "0A":
                kinds["listening"] += 1
            elif remote in backend_ports:
                kinds["to backends"] += 1
            elif local == listen_port:
                kinds["clients"] += 1
            else:
                kinds["other sockets"] += 1
        elif target.startswith("pipe:["):
            kinds["pipes"] += 1
        elif target.startswith("/"):
            kinds["files"] += 1
        else:
            kinds["other"] += 1
    return dict(sorted(kinds.items()))


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (a daemon's master spawns only workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text(encoding="latin-1")
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


class Cluster:
    """
    Starts, breaks and measures the processes of one soak.

    :ivar survivor: the worker that is never killed (the first one), whose
        memory and descriptors show what a long-lived worker does.
    """

    def __init__(self, procs: Processes, workdir: Path, settings: SoakSettings) -> None:
        self.procs = procs
        self.workdir = workdir
        self.settings = settings
        path = os.environ.get("PYTHONPATH")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""),
            "XDG_STATE_HOME": str(workdir / "xdg-state"),
        }
        self.port = free_port()
        self.fakes = {
            name: Fake(name, free_port(), workdir / f"fake-{name}.log") for name in ("a", "b")
        }
        self.config_path = workdir / "oproxy.yaml"
        self.log_path = workdir / "oproxy.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.survivor: int | None = None
        self.killed: list[int] = []

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    # -- the fakes -------------------------------------------------------------

    def start_fake(self, name: str) -> None:
        fake = self.fakes[name]
        stats_file = self.workdir / f"fake-{name}-{len(fake.lives) + 1}.json"
        fake.lives.append(stats_file)
        argv = [
            twistd_path(),
            "-n",
            "--pidfile=",
            f"--logfile={fake.log_path}",
            "oproxy-fake-ollama",
            "--listen",
            f"tcp:{fake.port}:interface={LOOPBACK}",
            "--token-delay",
            str(self.settings.token_delay),
            "--stats-file",
            str(stats_file),
        ]
        out = self.workdir / f"fake-{name}.out"
        fake.process = self.procs.start(argv, log_path=out, cwd=self.workdir, env=self.env)
        wait_for_port(fake.port, fake.process, out, 30)

    def stop_fake(self, name: str) -> dict[str, Any]:
        """
        ``SIGTERM`` to one fake; it ends the generations under way and
        writes its counters, which are returned.
        """
        fake = self.fakes[name]
        if fake.process is not None:
            self.procs.stop(fake.process, grace=15.0)
            fake.process = None
        stats_file = fake.lives[-1]
        if not stats_file.exists():
            raise BenchError(f"fake {name} wrote no {stats_file}:\n{tail(fake.log_path)}")
        counters: dict[str, Any] = json.loads(stats_file.read_text())
        return counters

    def fake_stats(self, name: str) -> dict[str, Any] | None:
        """A running fake's ``/_fake/stats`` (None when it is stopped)."""
        fake = self.fakes[name]
        if fake.process is None:
            return None
        with urllib.request.urlopen(f"{fake.url}/_fake/stats", timeout=10) as response:
            counters: dict[str, Any] = json.loads(response.read())
            return counters

    # -- the configuration and the keys ------------------------------------------

    def write_config(self) -> str:
        """
        Write the configuration, as configuration management would: a new
        file renamed over the old one.  Each generation flips the routing
        strategy, a change every worker must pick up.  Returns what changed.
        """
        strategy = ("round-robin", "least-busy")[self.generation % 2]
        a, b = self.fakes["a"], self.fakes["b"]
        text = f"""\
# oproxy soak, generation {self.generation}: rewritten every {self.settings.reload_every:g} s
listen: ["tcp:{self.port}:interface={LOOPBACK}"]
workers: 2
backends:
  - {{name: a, type: ollama, url: "{a.url}"}}
  - {{name: b, type: ollama, url: "{b.url}"}}
routing: {{strategy: {strategy}}}
auth: {{require_keys: true}}
state: {{path: "{self.workdir / "state.db"}"}}
"""
        fresh = self.config_path.with_suffix(".yaml.new")
        fresh.write_text(text)
        os.replace(fresh, self.config_path)
        self.generation += 1
        return f"routing.strategy {strategy}"

    def _oproxy(self, *arguments: str) -> str:
        argv = [sys.executable, "-m", "oproxy", "keys", "-c", str(self.config_path), *arguments]
        done = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, cwd=self.workdir, timeout=120
        )
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv[2:])} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def create_keys(self, names: list[str]) -> dict[str, str]:
        """``oproxy keys create NAME`` with day and month quotas (so both are counted)."""
        limits = ["--daily-tokens", str(QUOTA), "--monthly-tokens", str(QUOTA)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            tokens = list(pool.map(lambda n: self._oproxy("create", n, *limits).strip(), names))
        return dict(zip(names, tokens, strict=True))

    def key_usage(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """``oproxy keys show NAME --json`` for each key."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            shown = list(pool.map(lambda n: json.loads(self._oproxy("show", n, "--json")), names))
        return dict(zip(names, shown, strict=True))

    # -- the daemon -------------------------------------------------------------

    def start_daemon(self) -> None:
        """``twistd -n --logfile=- oproxy --config FILE``, as the systemd unit runs it."""
        argv = [
            twistd_path(),
            "-n",
            "--pidfile=",
            "--logfile=-",
            "oproxy",
            "--config",
            str(self.config_path),
        ]
        self.daemon = self.procs.start(argv, log_path=self.log_path, cwd=self.workdir, env=self.env)
        wait_for_port(self.port, self.daemon, self.log_path, 60)
        deadline = time.monotonic() + 60
        while len(self.workers()) < 2:
            if time.monotonic() > deadline:
                raise BenchError("two workers never started:\n" + tail(self.log_path))
            time.sleep(0.1)
        self.survivor = self.workers()[0]

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def workers(self) -> list[int]:
        """The live worker processes, oldest first."""
        if self.daemon is None:
            return []
        return [pid for pid in children(self.daemon.pid) if is_alive(pid)]

    def kill_worker(self) -> dict[str, Any]:
        """
        ``kill -9`` a worker other than the survivor, and wait for the master
        to start its successor and for that one to say it serves.
        """
        victims = [pid for pid in self.workers() if pid != self.survivor]
        if not victims:
            raise BenchError("no worker to kill: " + repr(self.workers()))
        victim = victims[-1]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        self.killed.append(victim)
        before = len(_SERVING.findall(self.log_text()))
        replaced = serving = None
        # The successor's "serving" line is waited for a while, not forever:
        # a daemon that words its log differently is still soaked.
        while time.monotonic() - killed < (30 if replaced is None else replaced + 15):
            fresh = [p for p in self.workers() if p != self.survivor and p not in self.killed]
            if replaced is None and fresh:
                replaced = time.monotonic() - killed
            if fresh and len(_SERVING.findall(self.log_text())) > before:
                serving = time.monotonic() - killed
                break
            time.sleep(0.05)
        return {
            "pid": victim,
            "replaced_after_s": None if replaced is None else round(replaced, 2),
            "serving_after_s": None if serving is None else round(serving, 2),
        }

    def sample(self) -> dict[str, ProcessSample]:
        """The master, the survivor and the other workers, by role."""
        if self.daemon is None:
            return {}
        found = {"master": self._sample(self.daemon.pid)}
        others = 0
        for pid in self.workers():
            if pid == self.survivor:
                found["survivor worker"] = self._sample(pid)
            else:
                others += 1
                found["killed-and-restarted worker"] = self._sample(pid)
        if others > 1:
            log(f"warning: {others} workers besides the survivor")
        return found

    def _sample(self, pid: int) -> ProcessSample:
        backends = {fake.port for fake in self.fakes.values()}
        kinds = descriptor_kinds(pid, self.port, backends)
        return ProcessSample(pid, rss_kib(pid), open_descriptors(pid), kinds)

    def terminate(self) -> dict[str, Any]:
        """``SIGTERM`` to the master; how long it took to exit, and how."""
        if self.daemon is None:
            return {"exit_status": None, "seconds": 0.0}
        sent = time.monotonic()
        os.kill(self.daemon.pid, signal.SIGTERM)
        try:
            status: int | None = self.daemon.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            status = None
        seconds = time.monotonic() - sent
        self.procs.stop(self.daemon)
        return {"exit_status": status, "seconds": round(seconds, 2)}

    # -- the log ----------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_findings(self) -> dict[str, Any]:
        """
        What the daemon's log says about the run: reloads seen by each
        worker, errors, and warnings by message.
        """
        lines = self.log_text().splitlines()
        reloaded = Counter(int(m.group(1)) for line in lines if (m := _RELOADED.search(line)))
        warnings = Counter(
            m.group(1)[:160] for line in lines if (m := _WARNING.search(line)) is not None
        )
        errors = [line[:300] for line in lines if _ERRORS.search(line)]
        return {
            "file_changes_seen": sum(1 for line in lines if _CHANGED.search(line)),
            "reloads_by_worker": {str(index): n for index, n in sorted(reloaded.items())},
            "settle_failures": sum(1 for line in lines if "settle failed" in line),
            "errors": errors[:50],
            "error_count": len(errors),
            "warnings": dict(warnings.most_common(20)),
        }
