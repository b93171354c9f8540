#!/usr/bin/env python3
"""
oproxy's benchmark harness: throughput, latency, streaming and memory in one run.

Usage (after ``apt-get install -y nginx-light wrk``)::

    python bench/run.py                # 10 s per measurement, ~6 minutes
    python bench/run.py --quick        # 3 s per measurement, a smoke run
    python bench/run.py --json results.json

What one run does (see bench/README.rst for how to read the output):

1. Starts a fake Ollama that costs next to nothing: nginx serving canned
   native answers (``bench/nginx.conf.template``) on two free loopback
   ports, one whose ``/api/chat`` is a non-streamed answer and one whose
   ``/api/chat`` is a ~300-line NDJSON stream (nginx cannot read the body,
   and oproxy always POSTs to ``/api/chat``).  Both serve ``/api/embed``
   (384 floats), ``/api/tags``, ``/api/version`` and ``/api/ps`` (the
   health probe's two calls).
2. For each target -- the upstream directly (the baseline, sent native
   Ollama requests), oproxy with ``workers: 1``, oproxy with ``workers: 2``,
   and oproxy serving response-cache hits -- starts the real daemon
   (``twistd -n oproxy --config FILE``) as a process, checks one request of
   each scenario by hand, warms up, and runs wrk (``bench/wrk/post.lua``)
   at high load (``-t2 -c32`` by default) and at moderate load (``-t1
   -c4``) for chat non-streaming, chat streaming and embeddings.  Time to
   first byte is measured separately with a raw-socket client (the median
   of ``--ttfb-requests`` sequential requests on one keep-alive
   connection).
3. Drives 100,000 non-streaming chat requests through a fresh 1-worker
   proxy (``bench/wrk/budget.lua`` stops after an exact budget) and reads
   VmRSS of the daemon and its children from ``/proc`` at 10,000 and at
   100,000 requests.
4. Prints the results as reStructuredText tables, with PASS/FAIL against
   the performance targets, and optionally writes them as JSON.
5. Stops every process it started (each runs in its own session, and the
   whole process tree is killed), even on Ctrl-C or an error.

Only the standard library is used.  All traffic goes to 127.0.0.1; every
load run is bounded in time, every loop in count.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
T = TypeVar("T")
LUA_DIR = BENCH_DIR / "wrk"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
LOOPBACK = "127.0.0.1"

CHAT_MODEL = "llama3.2"
EMBED_MODEL = "all-minilm"
EMBED_DIMS = 384
QUESTION = "Why is the sky blue?"
EMBED_TEXT = "The quick brown fox jumps over the lazy dog"
ANSWER = (
    "The sky looks blue because molecules in the air scatter short blue wavelengths "
    "of sunlight much more strongly than long red ones, an effect called Rayleigh scattering."
)

# The performance targets the run is judged against.
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 5.0
TARGET_RPS_1W = 1500.0
TARGET_SCALING_2W = 1.6
TARGET_TTFB_ADDED_MS = 1.0
TARGET_CHUNKS_PER_WORKER = 20000.0
TARGET_RSS_MB = 80.0
TARGET_RSS_FLAT_PCT = 10.0

SCENARIOS = ("chat", "stream", "embed")
SCENARIO_TITLES = {
    "chat": "chat non-streaming",
    "stream": "chat streaming",
    "embed": "embeddings",
}
TARGETS = ("direct", "w1", "w2", "cache")
TARGET_TITLES = {
    "direct": "direct (nginx)",
    "w1": "oproxy 1 worker",
    "w2": "oproxy 2 workers",
    "cache": "oproxy cache hit",
}


class BenchError(Exception):
    """Something the harness needs did not work; the message says what."""


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Processes: everything started goes through here, so it can all be stopped.
# --------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


@contextlib.contextmanager
def pinned(server_pid: int | None, load_pids: list[int], enabled: bool) -> Iterator[None]:
    """
    While measuring latency, keep the server under test on CPU 0 and the
    load (wrk, the upstream, this script) on CPU 1.

    On two cores shared by everything, a latency percentile otherwise
    measures who the scheduler ran first as much as the server itself; the
    direct baseline is measured the same way, so the difference stays fair.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        yield
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
    os.environ["BENCH_PIN_CPUS"] = ",".join(str(c) for c in load)
    try:
        yield
    finally:
        os.environ.pop("BENCH_PIN_CPUS", None)
        for pid in moved:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, set(cpus))


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


def is_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("latin-1")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of these processes, in clock ticks (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total


def machine_ticks() -> tuple[int, int]:
    """(all ticks, busy ticks) of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values[:8]), sum(values[:8]) - idle


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

    def __enter__(self) -> CpuMeter:
        self.started = time.monotonic()
        self.server0 = cpu_ticks(self.server)
        self.other0 = cpu_ticks(self.other)
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.machine0 = machine_ticks()
        return self

    def __exit__(self, *exc: Any) -> None:
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

    def start(self, argv: list[str], *, log_path: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
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
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return "\n".join("    " + line for line in text[-lines:])


# --------------------------------------------------------------------------
# The fake upstream: nginx with canned Ollama-native answers.
# --------------------------------------------------------------------------


def _created_at(i: int) -> str:
    return f"2025-06-01T12:00:{i // 1000 % 60:02d}.{123456789 + i * 37:09d}Z"


def canned_answers(stream_lines: int) -> dict[str, bytes]:
    """The answer files, in Ollama's field order and framing."""

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    words = ANSWER.split()
    metrics = {
        "total_duration": 4883583458,
        "load_duration": 1334875,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 342546000,
        "eval_count": stream_lines,
        "eval_duration": 4535599000,
    }
    chat = {
        "model": CHAT_MODEL,
        "created_at": _created_at(0),
        "message": {"role": "assistant", "content": " ".join(words)},
        "done": True,
        "done_reason": "stop",
        **metrics,
    }
    lines = []
    for i in range(stream_lines):
        word = words[i % len(words)]
        lines.append(
            dumps(
                {
                    "model": CHAT_MODEL,
                    "created_at": _created_at(i),
                    "message": {"role": "assistant", "content": word if i == 0 else " " + word},
                    "done": False,
                }
            )
        )
    lines.append(
        dumps(
            {
                "model": CHAT_MODEL,
                "created_at": _created_at(stream_lines),
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                **metrics,
            }
        )
    )
    raw = [math.sin(i * 0.7 + 0.3) + 0.25 * math.cos(i * 1.9) for i in range(EMBED_DIMS)]
    norm = math.sqrt(sum(v * v for v in raw))
    vector = [float(f"{v / norm:.9g}") for v in raw]
    embed = {
        "model": EMBED_MODEL,
        "embeddings": [vector],
        "total_duration": 14143917,
        "load_duration": 1019500,
        "prompt_eval_count": 2,
    }
    tags = {
        "models": [
            {
                "name": f"{name}:latest",
                "model": f"{name}:latest",
                "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                "size": size,
                "digest": digest,
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": family,
                    "families": [family],
                    "parameter_size": params,
                    "quantization_level": "Q4_K_M",
                },
            }
            for name, size, digest, family, params in (
                (
                    CHAT_MODEL,
                    2019393189,
                    "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
                    "llama",
                    "3.2B",
                ),
                (
                    EMBED_MODEL,
                    45960996,
                    "1b226e2802dbb772b5fc32a58f103ca1804ef7501331012de126ab22f67475ef",
                    "bert",
                    "23M",
                ),
            )
        ]
    }
    return {
        "chat": dumps(chat),
        "stream": b"\n".join(lines) + b"\n",
        "embed": dumps(embed),
        "tags": dumps(tags),
        "version": b'{"version":"0.12.6"}',
        # Nothing loaded: the health probe only needs Ollama's shape.
        "ps": b'{"models":[]}',
    }


@dataclass
class Upstream:
    plain_port: int
    stream_port: int
    process: subprocess.Popen[bytes]
    stream_lines: int
    paced_port: int | None = None


def start_nginx(procs: Processes, workdir: Path, stream_lines: int, workers: int) -> Upstream:
    prefix = workdir / "nginx"
    answers = canned_answers(stream_lines)
    for root, chat in (("plain", answers["chat"]), ("stream", answers["stream"])):
        api = prefix / root / "api"
        api.mkdir(parents=True, exist_ok=True)
        (api / "chat").write_bytes(chat)
        (api / "embed").write_bytes(answers["embed"])
        (api / "tags").write_bytes(answers["tags"])
        (api / "version").write_bytes(answers["version"])
        (api / "ps").write_bytes(answers["ps"])
    # Run as root, nginx's workers switch to an unprivileged user, which
    # must be able to read the answers under the temporary directory.
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    plain_port, stream_port = free_port(), free_port()
    while stream_port == plain_port:
        stream_port = free_port()
    user_line = "user nobody nogroup;" if os.geteuid() == 0 else "# (not root: no user switch)"
    conf = (BENCH_DIR / "nginx.conf.template").read_text()
    for name, value in {
        "PREFIX": str(prefix),
        "PLAIN_PORT": str(plain_port),
        "STREAM_PORT": str(stream_port),
        "NGINX_WORKERS": str(workers),
        "USER_LINE": user_line,
    }.items():
        conf = conf.replace(f"@{name}@", value)
    if "@" in re.sub(r"#.*", "", conf):
        raise BenchError("nginx.conf.template has a placeholder run.py does not know")
    (prefix / "nginx.conf").write_text(conf)
    log_path = workdir / "nginx.out"
    process = procs.start(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
        log_path=log_path,
    )
    for port in (plain_port, stream_port):
        wait_for_port(port, process, log_path, 15)
    return Upstream(plain_port, stream_port, process, stream_lines)


# --------------------------------------------------------------------------
# A paced upstream, for time to first byte.
# --------------------------------------------------------------------------


def serve_paced(port: int, stream_file: Path, pace_ms: float, lifetime: float) -> None:
    """
    Serve ``POST /api/chat`` with the canned stream, as Ollama frames it
    (chunked NDJSON), but paced like a model: the first line alone, then
    ``pace_ms`` later all the others.

    nginx sends the whole canned stream in one burst, so behind it the
    proxy's first byte waits for the whole burst to be translated; a model
    emits its first token well before the next.  This server, run as its own
    process (``run.py --paced-upstream PORT``), measures the first-token
    case.  It stops after ``lifetime`` seconds or when its parent exits.
    """
    lines = stream_file.read_bytes().splitlines(keepends=True)
    first, rest = lines[0], b"".join(lines[1:])
    pace = pace_ms / 1000

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n" % len(data) + data + b"\r\n"

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = b""
            for _ in range(10_000_000):
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                length = int(match.group(1)) if match else 0
                while len(buffer) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                buffer = buffer[length:]
                date = formatdate(usegmt=True).encode()
                if not head.startswith(b"POST /api/chat "):
                    body = b"404 page not found"
                    sock.sendall(
                        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nDate: "
                        + date
                        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                        + body
                    )
                    continue
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: "
                    + date
                    + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk(first)
                )
                time.sleep(pace)
                sock.sendall(chunk(rest) + b"0\r\n\r\n")

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    parent = os.getppid()
    with Server((LOOPBACK, port), Handler) as server:

        def watchdog() -> None:
            deadline = time.monotonic() + lifetime
            while time.monotonic() < deadline and os.getppid() == parent:
                time.sleep(0.5)
            server.shutdown()

        threading.Thread(target=watchdog, daemon=True).start()
        server.serve_forever(poll_interval=0.5)


def start_paced(
    procs: Processes, workdir: Path, pace_ms: float, lifetime: float
) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    log_path = workdir / "paced.out"
    process = procs.start(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--paced-upstream",
            str(port),
            "--paced-file",
            str(workdir / "nginx" / "stream" / "api" / "chat"),
            "--pace-ms",
            str(pace_ms),
            "--paced-lifetime",
            str(lifetime),
        ],
        log_path=log_path,
    )
    wait_for_port(port, process, log_path, 15)
    return port, process


# --------------------------------------------------------------------------
# oproxy as a real daemon.
# --------------------------------------------------------------------------


def twistd_path() -> str:
    beside = Path(sys.executable).parent / "twistd"
    if beside.exists():
        return str(beside)
    found = shutil.which("twistd")
    if not found:
        raise BenchError("twistd not found: pip install -e . in the repository first")
    return found


@dataclass
class Proxy:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path

    def serving_pids(self) -> list[int]:
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


# --------------------------------------------------------------------------
# Requests: bodies per scenario and target, and one-off checks.
# --------------------------------------------------------------------------


def request_for(scenario: str, target: str) -> tuple[str, dict[str, Any]]:
    """The path and JSON body wrk sends for one scenario on one target."""
    cached = target == "cache"
    messages = [{"role": "user", "content": QUESTION}]
    if target == "direct":
        if scenario == "embed":
            return "/api/embed", {"model": EMBED_MODEL, "input": EMBED_TEXT}
        return "/api/chat", {
            "model": CHAT_MODEL,
            "messages": messages,
            "stream": scenario == "stream",
        }
    if scenario == "embed":
        return "/v1/embeddings", {"model": EMBED_MODEL, "input": EMBED_TEXT}
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": messages}
    if scenario == "stream":
        body["stream"] = True
    if cached:
        body["temperature"] = 0
    return "/v1/chat/completions", body


@dataclass
class Probe:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def probe(port: int, path: str, body: dict[str, Any] | None, timeout: float = 15.0) -> Probe:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        started = time.perf_counter()
        if body is None:
            conn.request("GET", path)
        else:
            conn.request(
                "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
        response = conn.getresponse()
        data = response.read()
        return Probe(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            data,
            time.perf_counter() - started,
        )
    finally:
        conn.close()


def sse_events(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def check_answer(scenario: str, target: str, answer: Probe) -> dict[str, Any]:
    """
    Check one answer is what the scenario expects; return facts about it
    (chunks per streamed answer).  Raises BenchError when it is wrong.
    """
    what = f"{SCENARIO_TITLES[scenario]} on {TARGET_TITLES[target]}"
    if answer.status != 200:
        raise BenchError(f"{what}: HTTP {answer.status}: {answer.body[:300]!r}")
    try:
        if target == "direct":
            if scenario == "stream":
                lines = [json.loads(x) for x in answer.body.splitlines() if x.strip()]
                assert lines[-1]["done"] is True
                return {"chunks": len(lines)}
            obj = json.loads(answer.body)
            if scenario == "embed":
                assert len(obj["embeddings"][0]) == EMBED_DIMS
            else:
                assert obj["message"]["content"]
            return {}
        if scenario == "stream":
            events = sse_events(answer.body)
            assert events and events[-1] == b"[DONE]", "no [DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks)
            return {"chunks": len(chunks)}
        obj = json.loads(answer.body)
        if scenario == "embed":
            assert len(obj["data"][0]["embedding"]) == EMBED_DIMS
        else:
            assert obj["choices"][0]["message"]["content"]
        return {}
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{what}: unexpected answer ({e}): {answer.body[:300]!r}") from None


def wait_until_serving(port: int, scenario: str, target: str, timeout: float = 30.0) -> None:
    """Workers may still be starting after the port opens: retry one request."""
    path, body = request_for(scenario, target)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = probe(port, path, body, timeout=5)
            if answer.status == 200:
                return
            last = f"HTTP {answer.status}: {answer.body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise BenchError(f"{TARGET_TITLES[target]} never answered 200 ({last})")


# --------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------

_UNITS_TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS_TO_MS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """
    wrk's summary: requests/s, latency percentiles (ms), errors.

    The exact numbers come from the ``BENCH_JSON`` line post.lua prints; the
    ``--latency`` text is parsed too, as the fallback and a cross-check.
    """
    result: dict[str, Any] = {}
    text_pct: dict[str, float] = {}
    for match in re.finditer(r"^\s+(50|75|90|99)(?:\.000)?%\s+(\S+)\s*$", output, re.M):
        text_pct[match.group(1)] = _ms(match.group(2))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(\w+),", output, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockerr = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    exact = re.search(r"^BENCH_JSON (\{.*\})$", output, re.M)
    if exact:
        data = json.loads(exact.group(1))
        lat = data["latency_us"]
        seconds = data["duration_us"] / 1e6
        result.update(
            requests=data["requests"],
            seconds=seconds,
            rps=data["requests"] / seconds if seconds else 0.0,
            p50_ms=lat["p50"] / 1000,
            p75_ms=lat["p75"] / 1000,
            p90_ms=lat["p90"] / 1000,
            p99_ms=lat["p99"] / 1000,
            p999_ms=lat["p999"] / 1000,
            mean_ms=lat["mean"] / 1000,
            max_ms=lat["max"] / 1000,
            bytes=data["bytes"],
            errors=sum(data["errors"].values()),
            error_detail=data["errors"],
        )
    elif rps and total and "50" in text_pct:
        result.update(
            requests=int(total.group(1)),
            rps=float(rps.group(1)),
            p50_ms=text_pct["50"],
            p75_ms=text_pct.get("75"),
            p90_ms=text_pct.get("90"),
            p99_ms=text_pct.get("99"),
            errors=(int(non2xx.group(1)) if non2xx else 0)
            + (sum(int(g) for g in sockerr.groups()) if sockerr else 0),
        )
    else:
        raise BenchError("could not parse wrk's output:\n" + output[-2000:])
    result["text_percentiles_ms"] = text_pct
    if rps:
        result["text_rps"] = float(rps.group(1))
    return result


def run_wrk(
    procs: Processes,
    workdir: Path,
    port: int,
    path: str,
    body: dict[str, Any],
    *,
    threads: int,
    connections: int,
    seconds: float,
    label: str,
    delay_ms: float = 0.0,
) -> dict[str, Any]:
    body_file = workdir / "body.json"
    body_file.write_bytes(json.dumps(body).encode())
    env = {**os.environ, "BENCH_BODY": str(body_file), "BENCH_LUA_DIR": str(LUA_DIR)}
    if delay_ms > 0:
        env["BENCH_DELAY_MS"] = f"{delay_ms:.3f}"
    threads = max(1, min(threads, connections))
    argv = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_DIR / "post.lua"),
        f"http://{LOOPBACK}:{port}{path}",
    ]
    out_path = workdir / "wrk.out"
    out_path.write_bytes(b"")
    pin = os.environ.get("BENCH_PIN_CPUS")
    if pin:
        argv = ["taskset", "-c", pin, *argv]
    process = procs.start(argv, log_path=out_path, env=env)
    try:
        process.wait(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk ({label}) did not finish in time") from None
    finally:
        procs.stop(process)
    output = out_path.read_text(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"wrk ({label}) failed with {process.returncode}:\n{output[-2000:]}")
    result = parse_wrk(output)
    result.update(threads=threads, connections=connections, duration_s=seconds, delay_ms=delay_ms)
    return result


def run_wrk_budget(
    procs: Processes,
    workdir: Path,
    port: int,
    path: str,
    body: dict[str, Any],
    *,
    threads: int,
    connections: int,
    total: int,
    max_seconds: float,
) -> dict[str, Any]:
    """
    Drive exactly ``total`` responses (rounded up to a multiple of the
    threads), however long it takes up to ``max_seconds``.
    """
    body_file = workdir / "body.json"
    body_file.write_bytes(json.dumps(body).encode())
    markers = Path(tempfile.mkdtemp(prefix="markers-", dir=workdir))
    threads = max(1, min(threads, connections))
    per_thread = math.ceil(total / threads)
    env = {
        **os.environ,
        "BENCH_BODY": str(body_file),
        "BENCH_LUA_DIR": str(LUA_DIR),
        "BENCH_BUDGET": str(per_thread),
        "BENCH_MARKERS": str(markers),
    }
    argv = [
        WRK,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{math.ceil(max_seconds)}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_DIR / "budget.lua"),
        f"http://{LOOPBACK}:{port}{path}",
    ]
    out_path = workdir / "wrk-budget.out"
    out_path.write_bytes(b"")
    started = time.monotonic()
    process = procs.start(argv, log_path=out_path, env=env)
    finished = False
    try:
        deadline = started + max_seconds + 5
        while time.monotonic() < deadline and process.poll() is None:
            if len(list(markers.iterdir())) >= threads:
                finished = True
                process.send_signal(signal.SIGINT)  # ends wrk's sleep; it prints its summary
                break
            time.sleep(0.05)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk (request budget) did not stop") from None
    finally:
        procs.stop(process)
    output = out_path.read_text(errors="replace")
    result = parse_wrk(output)
    result.update(
        threads=threads,
        connections=connections,
        budget=per_thread * threads,
        budget_reached=finished,
        wall_s=time.monotonic() - started,
    )
    return result


# --------------------------------------------------------------------------
# Time to first byte, with a raw socket.
# --------------------------------------------------------------------------


class RawClient:
    """
    A minimal HTTP/1.1 client on one keep-alive connection, timing the first
    byte of each answer and reading the rest (Content-Length or chunked).
    """

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def connect(self) -> None:
        self.close()
        self.sock = socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("connection closed mid-answer")
        return data

    def _need(self, size: int) -> None:
        while len(self.buffer) < size:
            self.buffer += self._recv()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self.buffer += self._recv()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def request(self, request: bytes) -> tuple[int, float, float]:
        """Send; return (status, seconds to first byte, seconds to last byte)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        started = time.perf_counter()
        self.sock.sendall(request)
        if not self.buffer:
            self.buffer = self._recv()
        first = time.perf_counter()
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "chunked" in headers.get("transfer-encoding", ""):
            for _ in range(1_000_000):
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailers, then the empty line
                        pass
                    break
                self._need(size + 2)
                self.buffer = self.buffer[size + 2 :]
        elif "content-length" in headers:
            size = int(headers["content-length"])
            self._need(size)
            self.buffer = self.buffer[size:]
        else:
            raise ConnectionError("answer with neither Content-Length nor chunked framing")
        last = time.perf_counter()
        if headers.get("connection") == "close":
            self.close()
        return status, first - started, last - started


def measure_ttfb(
    port: int, path: str, body: dict[str, Any], count: int, warmup: int
) -> dict[str, Any]:
    payload = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    client = RawClient(port)
    firsts, lasts = [], []
    try:
        for i in range(warmup + count):
            try:
                status, first, last = client.request(request)
            except (OSError, ConnectionError):
                client.close()  # one reconnect per failure, then go on
                status, first, last = client.request(request)
            if status != 200:
                raise BenchError(f"TTFB request to {path} answered HTTP {status}")
            if i >= warmup:
                firsts.append(first * 1000)
                lasts.append(last * 1000)
    finally:
        client.close()
    firsts.sort()
    return {
        "requests": count,
        "ttfb_median_ms": statistics.median(firsts),
        "ttfb_p90_ms": firsts[int(0.9 * (len(firsts) - 1))],
        "total_median_ms": statistics.median(lasts),
    }


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


@dataclass
class Cell:
    scenario: str
    target: str
    processes: int | None = None
    high: dict[str, Any] | None = None
    low: dict[str, Any] | None = None
    chunks_per_answer: int | None = None
    ttfb: dict[str, Any] | None = None
    ttfb_paced: dict[str, Any] | None = None
    x_cache: list[str] = field(default_factory=list)
    cache_hit: bool | None = None
    note: str = ""
    error: str = ""


@dataclass
class Settings:
    duration: float
    warmup: float
    threads: int
    connections: int
    low_threads: int
    low_connections: int
    low_rps: float
    ttfb_requests: int
    stream_lines: int
    pace_ms: float
    mem_checkpoint: int
    mem_requests: int
    targets: tuple[str, ...]
    scenarios: tuple[str, ...]
    memory: bool
    nginx_workers: int
    wait_quiet: float
    pin: bool = True
    rounds: int = 3


@dataclass
class Results:
    meta: dict[str, Any]
    settings: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    scaling: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    criteria: list[dict[str, Any]] = field(default_factory=list)

    def cell(self, scenario: str, target: str) -> Cell | None:
        for c in self.cells:
            if c.scenario == scenario and c.target == target:
                return c
        return None


def cpu_busy_pct(seconds: float = 1.0) -> float:
    """How busy the CPUs are (all processes, this machine), sampled over ``seconds``."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values[:8]), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def environment_facts() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version as pkg_version

        oproxy_version = pkg_version("oproxy")
        twisted_version = pkg_version("twisted")
    except Exception:
        oproxy_version = twisted_version = "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "oproxy": oproxy_version,
        "twisted": twisted_version,
        "nginx": version([NGINX, "-v"]),
        "wrk": version([WRK, "-v"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def measure_target(
    procs: Processes,
    workdir: Path,
    upstream: Upstream,
    settings: Settings,
    results: Results,
    target: str,
) -> None:
    """Every scenario on one target; a failure is recorded in its cells."""
    workers = 2 if target == "w2" else 1
    cache = {"direct": None, "w1": False, "w2": False, "cache": True}[target]
    for kind in ("plain", "stream"):
        scenarios = [s for s in settings.scenarios if (s == "stream") == (kind == "stream")]
        if not scenarios:
            continue
        upstream_port = upstream.stream_port if kind == "stream" else upstream.plain_port
        proxy: Proxy | None = None
        cells = [Cell(s, target) for s in scenarios]
        results.cells.extend(cells)
        try:
            if target == "direct":
                port = upstream_port
                processes = 1
            else:
                log(f"starting oproxy ({TARGET_TITLES[target]}, {kind} upstream)")
                proxy = start_proxy(
                    procs, workdir, f"{target}-{kind}", upstream_port, workers=workers, cache=cache
                )
                port = proxy.port
                wait_until_serving(port, scenarios[0], target)
                # Give worker processes time to appear before counting them.
                time.sleep(1.0 if workers > 1 else 0.2)
                processes = len(proxy.serving_pids())
        except BenchError as e:
            for cell in cells:
                cell.error = str(e)
            log(f"error: {e}")
            if proxy is not None:
                procs.stop(proxy.process)
            continue
        try:
            for cell in cells:
                try:
                    measure_cell(
                        procs,
                        workdir,
                        settings,
                        cell,
                        port,
                        processes,
                        upstream,
                        proxy.process.pid if proxy is not None else upstream.process.pid,
                    )
                except BenchError as e:
                    cell.error = str(e)
                    log(f"error: {e}")
                    if proxy is not None:
                        log("  daemon log:\n" + tail(proxy.log_path, 10))
        finally:
            if proxy is not None:
                procs.stop(proxy.process)
    stream_cell = results.cell("stream", target)
    if (
        upstream.paced_port
        and target != "cache"
        and stream_cell is not None
        and not stream_cell.error
    ):
        measure_paced_ttfb(procs, workdir, upstream, settings, stream_cell)


def alternate(rounds: int, sides: dict[str, Callable[[], T]]) -> dict[str, list[T]]:
    """
    Measure every side once per round, in turn, ``rounds`` times.

    Two rows of the table are measured minutes apart, and the load of a
    shared host drifts in minutes: a difference or a ratio between them moves
    from one run to the next.  Alternating puts both sides under the same
    drift; the targets compare medians.
    """
    values: dict[str, list[T]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            values[name].append(measure())
    return values


def measure_latency_rounds(
    procs: Processes, workdir: Path, upstream: Upstream, settings: Settings
) -> dict[str, Any]:
    """
    Added latency of one worker, from alternating runs against the direct
    baseline: at moderate load (chat, embeddings) and, behind the paced
    upstream, time to first byte.
    """
    found: dict[str, Any] = {"rounds": settings.rounds}
    for scenario in ("chat", "embed", "stream"):
        paced = scenario == "stream"
        if scenario not in settings.scenarios or (
            paced and (not upstream.paced_port or settings.ttfb_requests <= 0)
        ):
            continue
        values = _latency_rounds(procs, workdir, upstream, settings, scenario)
        found["ttfb_paced" if paced else scenario] = {
            measure: {
                "direct": [v[measure] for v in values["direct"]],
                "w1": [v[measure] for v in values["w1"]],
                "added_ms": statistics.median(v[measure] for v in values["w1"])
                - statistics.median(v[measure] for v in values["direct"]),
            }
            for measure in values["w1"][0]
        }
    return found


def _latency_rounds(
    procs: Processes, workdir: Path, upstream: Upstream, settings: Settings, scenario: str
) -> dict[str, list[dict[str, float]]]:
    """One scenario's alternating rounds: moderate-load p50/p99, or paced TTFB."""
    paced = scenario == "stream"
    upstream_port = upstream.paced_port if paced else upstream.plain_port
    assert upstream_port is not None
    proxy = start_proxy(
        procs, workdir, f"w1-{scenario}-rounds", upstream_port, workers=1, cache=False
    )
    ports = {"direct": upstream_port, "w1": proxy.port}
    pids = {"direct": None, "w1": proxy.process.pid}

    def side(target: str) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            wait_for_quiet(settings.wait_quiet)
            request = request_for(scenario, target)
            label = f"{SCENARIO_TITLES[scenario]} / {TARGET_TITLES[target]}, round"
            if paced:
                ttfb = measure_ttfb(ports[target], *request, settings.ttfb_requests, warmup=20)
                log(f"{label}: TTFB median {ttfb['ttfb_median_ms']:.3f} ms")
                return {"ttfb": float(ttfb["ttfb_median_ms"])}
            result = moderate_run(
                procs,
                workdir,
                settings,
                ports[target],
                request,
                pids[target],
                upstream,
                pin=settings.pin,
                label=label,
            )
            return {"p50": float(result["p50_ms"]), "p99": float(result["p99_ms"])}

        return measure

    try:
        wait_until_serving(proxy.port, scenario, "w1")
        run_wrk(
            procs,
            workdir,
            proxy.port,
            *request_for(scenario, "w1"),
            threads=settings.threads,
            connections=settings.connections,
            seconds=settings.warmup,
            label=f"warm-up, {scenario} rounds",
        )
        return alternate(settings.rounds, {t: side(t) for t in ("direct", "w1")})
    finally:
        procs.stop(proxy.process)


def measure_scaling(
    procs: Processes, workdir: Path, upstream: Upstream, settings: Settings
) -> dict[str, Any]:
    """
    Requests/s of one worker and of two, measured in alternation.

    The table's rows for 1 and 2 workers are measured minutes apart, and the
    load of a shared host drifts in minutes: their ratio can move by a tenth
    from one run to the next.  Here both daemons run side by side (the one
    not under load is idle) and wrk alternates between them, ``rounds``
    times each (:func:`alternate`); the ratio is taken between the medians.
    """
    path, body = request_for("chat", "w1")
    proxies: dict[str, Proxy] = {}
    try:
        for target, workers in (("w1", 1), ("w2", 2)):
            proxies[target] = start_proxy(
                procs,
                workdir,
                f"{target}-scaling",
                upstream.plain_port,
                workers=workers,
                cache=False,
            )
            wait_until_serving(proxies[target].port, "chat", target)
        time.sleep(1.0)  # worker processes appear

        def load(proxy: Proxy, seconds: float, label: str) -> float:
            result = run_wrk(
                procs,
                workdir,
                proxy.port,
                path,
                body,
                threads=settings.threads,
                connections=settings.connections,
                seconds=seconds,
                label=label,
            )
            return float(result["rps"])

        for target, proxy in proxies.items():
            load(proxy, settings.warmup, f"scaling warm-up ({target})")

        def side(target: str) -> Callable[[], float]:
            def measure() -> float:
                wait_for_quiet(settings.wait_quiet)
                found = load(proxies[target], settings.duration, f"scaling ({target})")
                log(f"scaling: {TARGET_TITLES[target]} {found:,.0f} req/s")
                return found

            return measure

        rps = alternate(settings.rounds, {t: side(t) for t in proxies})
    finally:
        for proxy in proxies.values():
            procs.stop(proxy.process)
    w1, w2 = statistics.median(rps["w1"]), statistics.median(rps["w2"])
    return {
        "rounds": settings.rounds,
        "w1_rps": rps["w1"],
        "w2_rps": rps["w2"],
        "w1_median": w1,
        "w2_median": w2,
        "ratio": w2 / w1 if w1 else None,
    }


def measure_paced_ttfb(
    procs: Processes, workdir: Path, upstream: Upstream, settings: Settings, cell: Cell
) -> None:
    """Time to first byte behind the paced upstream (the first line comes alone)."""
    target = cell.target
    assert upstream.paced_port is not None
    path, body = request_for("stream", target)
    proxy: Proxy | None = None
    try:
        if target == "direct":
            port = upstream.paced_port
        else:
            proxy = start_proxy(
                procs,
                workdir,
                f"{target}-paced",
                upstream.paced_port,
                workers=2 if target == "w2" else 1,
                cache=False,
            )
            port = proxy.port
            wait_until_serving(port, "stream", target)
        check_answer("stream", target, probe(port, path, body))
        cell.ttfb_paced = measure_ttfb(
            port, path, body, settings.ttfb_requests, warmup=min(20, settings.ttfb_requests)
        )
        cell.ttfb_paced["pace_ms"] = settings.pace_ms
        log(
            f"{SCENARIO_TITLES['stream']} / {TARGET_TITLES[target]}: TTFB median behind the paced "
            f"upstream {cell.ttfb_paced['ttfb_median_ms']:.3f} ms"
        )
    except BenchError as e:
        log(f"error (paced TTFB, {TARGET_TITLES[target]}): {e}")
        cell.note = "paced TTFB failed"
    finally:
        if proxy is not None:
            procs.stop(proxy.process)


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


def moderate_delay_ms(settings: Settings) -> float:
    """The pause per connection that offers about ``low_rps`` requests/s in total."""
    return settings.low_connections / settings.low_rps * 1000.0


def moderate_run(
    procs: Processes,
    workdir: Path,
    settings: Settings,
    port: int,
    request: tuple[str, dict[str, Any]],
    server_pid: int | None,
    upstream: Upstream,
    *,
    pin: bool,
    label: str,
) -> dict[str, Any]:
    """
    One moderate-load wrk run: its latency percentiles and CPU use.

    Latency under load is measured with the server and the load on separate
    cores (not for two workers, which need both: ``pin`` false).  Sequential
    TTFB runs one request at a time, so it has no load to separate.
    """
    path, body = request
    with (
        pinned(server_pid, [upstream.process.pid], pin),
        CpuMeter([server_pid or upstream.process.pid], [upstream.process.pid]) as meter,
    ):
        result = run_wrk(
            procs,
            workdir,
            port,
            path,
            body,
            threads=settings.low_threads,
            connections=settings.low_connections,
            seconds=settings.duration,
            label=label,
            delay_ms=moderate_delay_ms(settings),
        )
    result["cpu"] = meter.result
    log(
        f"  {result['rps']:.0f} req/s, p50 {result['p50_ms']:.3f} ms, "
        f"p99 {result['p99_ms']:.3f} ms; other work {meter.result['foreign_cores']:.2f} cores"
    )
    return result


def measure_cell(
    procs: Processes,
    workdir: Path,
    settings: Settings,
    cell: Cell,
    port: int,
    processes: int,
    upstream: Upstream,
    server_pid: int,
) -> None:
    scenario, target = cell.scenario, cell.target
    title = f"{SCENARIO_TITLES[scenario]} / {TARGET_TITLES[target]}"
    path, body = request_for(scenario, target)
    cell.processes = processes
    first = probe(port, path, body)
    facts = check_answer(scenario, target, first)
    cell.chunks_per_answer = facts.get("chunks")
    # The cache is on by default and shows itself only in X-Cache: keep what
    # three more identical requests got (BYPASS where it is turned off).
    cell.x_cache = [first.headers.get("x-cache", "")]
    for _ in range(3 if target != "direct" else 0):
        again = probe(port, path, body)
        check_answer(scenario, target, again)
        cell.x_cache.append(again.headers.get("x-cache", ""))
    hits = any(v.upper().startswith("HIT") for v in cell.x_cache)
    if target == "cache":
        cell.cache_hit = hits
        if not hits:
            cell.note = "cache: n/a"
            log(f"{title}: no X-Cache: HIT seen ({cell.x_cache!r}); cache: n/a")
            return
    elif hits:
        cell.note = "cache hits!"
        log(f"warning: {title} was answered from the cache ({cell.x_cache!r})")
    wait_for_quiet(settings.wait_quiet)
    log(f"{title}: warm-up {settings.warmup:.0f}s")
    run_wrk(
        procs,
        workdir,
        port,
        path,
        body,
        threads=settings.threads,
        connections=settings.connections,
        seconds=settings.warmup,
        label=f"warm-up {title}",
    )
    log(f"{title}: wrk -t{settings.threads} -c{settings.connections} -d{settings.duration:.0f}s")
    with CpuMeter([server_pid], [upstream.process.pid]) as meter:
        cell.high = run_wrk(
            procs,
            workdir,
            port,
            path,
            body,
            threads=settings.threads,
            connections=settings.connections,
            seconds=settings.duration,
            label=title,
        )
    cell.high["cpu"] = meter.result
    log(
        f"  {cell.high['rps']:.0f} req/s, p50 {cell.high['p50_ms']:.2f} ms, "
        f"p99 {cell.high['p99_ms']:.2f} ms, errors {cell.high['errors']}; "
        f"server {meter.result['server_cores']:.2f} cores, "
        f"other work {meter.result['foreign_cores']:.2f} cores"
    )
    delay_ms = moderate_delay_ms(settings)
    log(
        f"{title}: moderate load wrk -t{settings.low_threads} "
        f"-c{settings.low_connections} -d{settings.duration:.0f}s, "
        f"{delay_ms:.1f} ms pause per connection"
    )
    direct = server_pid == upstream.process.pid
    cell.low = moderate_run(
        procs,
        workdir,
        settings,
        port,
        (path, body),
        None if direct else server_pid,
        upstream,
        pin=settings.pin and target != "w2",
        label=f"moderate {title}",
    )
    if scenario in ("chat", "stream") and settings.ttfb_requests > 0:
        cell.ttfb = measure_ttfb(
            port, path, body, settings.ttfb_requests, warmup=min(20, settings.ttfb_requests)
        )
        log(
            f"  TTFB median {cell.ttfb['ttfb_median_ms']:.3f} ms over "
            f"{settings.ttfb_requests} sequential requests"
        )


def measure_memory(
    procs: Processes, workdir: Path, upstream: Upstream, settings: Settings
) -> dict[str, Any]:
    """
    A fresh 1-worker proxy (the daemon's default cache setting), VmRSS at
    the checkpoint and at the total number of non-streaming chat requests.
    """
    log("memory: starting a fresh oproxy (1 worker)")
    proxy = start_proxy(procs, workdir, "memory", upstream.plain_port, workers=1, cache=None)
    try:
        wait_until_serving(proxy.port, "chat", "w1")
        path, body = request_for("chat", "w1")

        def snapshot() -> dict[str, Any]:
            time.sleep(0.5)  # let the last answers be written and freed
            per: dict[int, int] = {}
            for pid in proxy.serving_pids():
                kib = rss_kib(pid)
                if kib is not None:
                    per[pid] = kib
            return {
                "processes": len(per),
                "rss_mib_total": sum(per.values()) / 1024,
                "rss_mib_max_process": max(per.values()) / 1024 if per else 0.0,
                "rss_mib_by_pid": {str(pid): kib / 1024 for pid, kib in per.items()},
            }

        memory: dict[str, Any] = {"start": snapshot()}
        done = 0
        for goal in (settings.mem_checkpoint, settings.mem_requests):
            budget = goal - done
            # At worst 100 req/s, and never more than 30 minutes per leg.
            limit = min(1800.0, 30 + budget / 100)
            wait_for_quiet(settings.wait_quiet)
            log(f"memory: {budget:,} requests (to {goal:,})")
            with CpuMeter([proxy.process.pid], [upstream.process.pid]) as meter:
                run = run_wrk_budget(
                    procs,
                    workdir,
                    proxy.port,
                    path,
                    body,
                    threads=settings.threads,
                    connections=settings.connections,
                    total=budget,
                    max_seconds=limit,
                )
            done += run["requests"]
            snap = snapshot()
            snap.update(
                requests_done=done,
                run_rps=run["rps"],
                run_errors=run["errors"],
                budget_reached=run["budget_reached"],
                cpu=meter.result,
            )
            memory[str(goal)] = snap
            log(
                f"  after {done:,} requests: VmRSS {snap['rss_mib_total']:.1f} MiB "
                f"in {snap['processes']} process(es); {run['rps']:.0f} req/s, "
                f"{run['errors']} errors"
            )
            if proxy.process.poll() is not None:
                raise BenchError("the proxy died during the memory run:\n" + tail(proxy.log_path))
        first = memory[str(settings.mem_checkpoint)]["rss_mib_total"]
        last = memory[str(settings.mem_requests)]["rss_mib_total"]
        memory["checkpoint"] = settings.mem_checkpoint
        memory["total"] = settings.mem_requests
        memory["change_pct"] = (last - first) / first * 100 if first else None
        return memory
    finally:
        procs.stop(proxy.process)


# --------------------------------------------------------------------------
# Judging and printing.
# --------------------------------------------------------------------------


def _get(cell: Cell | None, part: str, key: str) -> float | None:
    if cell is None or cell.error:
        return None
    data = getattr(cell, part)
    if not data:
        return None
    value = data.get(key)
    return float(value) if value is not None else None


def judge(results: Results) -> None:
    criteria = results.criteria

    def add(
        name: str,
        measured: float | None,
        target: str,
        ok: bool | None,
        unit: str = "",
        rows: tuple[tuple[str, str], ...] = (),
    ) -> None:
        criteria.append(
            {
                "criterion": name,
                "measured": measured,
                "unit": unit,
                "target": target,
                "verdict": "n/a" if ok is None or measured is None else ("PASS" if ok else "FAIL"),
                "rows": [list(r) for r in rows],
            }
        )

    latency = results.latency if results.latency and "error" not in results.latency else {}
    alternating = f" (medians of {latency.get('rounds')} alternating runs)" if latency else ""

    def added_in_rounds(key: str, measure: str) -> float | None:
        found = latency.get(key, {}).get(measure)
        return float(found["added_ms"]) if found else None

    for scenario in ("chat", "embed"):
        direct, w1 = results.cell(scenario, "direct"), results.cell(scenario, "w1")
        for pct, limit in (("p50", TARGET_ADDED_P50_MS), ("p99", TARGET_ADDED_P99_MS)):
            d, p = _get(direct, "low", f"{pct}_ms"), _get(w1, "low", f"{pct}_ms")
            added = p - d if d is not None and p is not None else None
            if scenario in latency:
                added = added_in_rounds(scenario, pct)
            add(
                f"{SCENARIO_TITLES[scenario]}: added {pct} at moderate load (1 worker)"
                + (alternating if scenario in latency else ""),
                added,
                f"<= {limit:g} ms",
                added is not None and added <= limit,
                "ms",
                ((scenario, "w1"),),
            )
    rps1 = _get(results.cell("chat", "w1"), "high", "rps")
    add(
        "chat non-streaming: req/s (1 worker)",
        rps1,
        f">= {TARGET_RPS_1W:,.0f} req/s",
        rps1 is not None and rps1 >= TARGET_RPS_1W,
        "req/s",
        (("chat", "w1"),),
    )
    scaling = results.scaling
    if scaling and "error" not in scaling:
        scale = scaling["ratio"]
        scale_name = (
            "chat non-streaming: req/s, 2 workers / 1 worker "
            f"(medians of {scaling['rounds']} alternating runs)"
        )
    else:
        rps2 = _get(results.cell("chat", "w2"), "high", "rps")
        scale = rps2 / rps1 if rps1 and rps2 else None
        scale_name = "chat non-streaming: req/s, 2 workers / 1 worker"
    add(
        scale_name,
        scale,
        f">= {TARGET_SCALING_2W:g}x",
        scale is not None and scale >= TARGET_SCALING_2W,
        "x",
        (("chat", "w2"),),
    )
    for part, how in (
        ("ttfb_paced", "paced upstream"),
        ("ttfb", "nginx burst"),
    ):
        d = _get(results.cell("stream", "direct"), part, "ttfb_median_ms")
        p = _get(results.cell("stream", "w1"), part, "ttfb_median_ms")
        added = p - d if d is not None and p is not None else None
        in_rounds = part == "ttfb_paced" and "ttfb_paced" in latency
        if in_rounds:
            added = added_in_rounds("ttfb_paced", "ttfb")
        add(
            f"chat streaming: added TTFB, {how} (1 worker)" + (alternating if in_rounds else ""),
            added,
            f"<= {TARGET_TTFB_ADDED_MS:g} ms",
            added is not None and added <= TARGET_TTFB_ADDED_MS,
            "ms",
            (("stream", "w1"),),
        )
    for target, workers in (("w1", 1), ("w2", 2)):
        cell = results.cell("stream", target)
        rps = _get(cell, "high", "rps")
        per = (
            rps * cell.chunks_per_answer / workers
            if rps and cell and cell.chunks_per_answer
            else None
        )
        add(
            f"chat streaming: SSE chunks/s per worker ({workers} worker{'s' * (workers > 1)})",
            per,
            f">= {TARGET_CHUNKS_PER_WORKER:,.0f}/s",
            per is not None and per >= TARGET_CHUNKS_PER_WORKER,
            "chunks/s",
            (("stream", target),),
        )
    memory = results.memory
    if memory and "error" not in memory:
        last = memory[str(memory["total"])]
        add(
            f"memory: VmRSS per worker after {memory['total']:,} requests",
            last["rss_mib_max_process"] * 1.048576,
            f"<= {TARGET_RSS_MB:g} MB",
            last["rss_mib_max_process"] * 1.048576 <= TARGET_RSS_MB,
            "MB",
        )
        change = memory["change_pct"]
        add(
            f"memory: VmRSS change, {memory['checkpoint']:,} to {memory['total']:,} requests",
            change,
            f"within +/-{TARGET_RSS_FLAT_PCT:g}%",
            change is not None and abs(change) <= TARGET_RSS_FLAT_PCT,
            "%",
        )
    else:
        add("memory: VmRSS per worker", None, f"<= {TARGET_RSS_MB:g} MB", None, "MB")
        add("memory: VmRSS change", None, f"within +/-{TARGET_RSS_FLAT_PCT:g}%", None, "%")


def rst_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A reStructuredText simple table (so it can be pasted into the README)."""
    right = right or set()
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(
            (c.rjust(w) if i in right else c.ljust(w))
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([rule, line(headers), rule, *(line(r) for r in rows), rule])


def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def render(results: Results) -> str:
    out: list[str] = []
    s = results.settings
    verdicts: dict[tuple[str, str], list[str]] = {}
    for c in results.criteria:
        for scenario, target in c["rows"]:
            verdicts.setdefault((scenario, target), []).append(c["verdict"])

    headers = [
        "scenario",
        "target",
        "procs",
        "cpu",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x direct",
        "mod p50",
        "mod p99",
        "+p50 ms",
        "+p99 ms",
        "errors",
        "check",
    ]
    rows = []
    for scenario in s["scenarios"]:
        direct = results.cell(scenario, "direct")
        for target in s["targets"]:
            cell = results.cell(scenario, target)
            if cell is None:
                continue
            if cell.error:
                rows.append(
                    [
                        SCENARIO_TITLES[scenario],
                        TARGET_TITLES[target],
                        "-",
                        "-",
                        "error",
                        *["-"] * 8,
                        "ERROR",
                    ]
                )
                continue
            if cell.high is None:
                rows.append(
                    [
                        SCENARIO_TITLES[scenario],
                        TARGET_TITLES[target],
                        str(cell.processes or "-"),
                        *["-"] * 10,
                        cell.note or "-",
                    ]
                )
                continue
            rps = cell.high["rps"]
            d_rps = _get(direct, "high", "rps")
            ratio = rps / d_rps if d_rps and target != "direct" else None
            added = {}
            for pct in ("p50", "p99"):
                dv, pv = _get(direct, "low", f"{pct}_ms"), _get(cell, "low", f"{pct}_ms")
                added[pct] = (
                    pv - dv if target != "direct" and dv is not None and pv is not None else None
                )
            v = verdicts.get((scenario, target), [])
            check = "FAIL" if "FAIL" in v else ("PASS" if "PASS" in v else "-")
            if cell.note:
                check = cell.note if check == "-" else f"{check}; {cell.note}"
            errors = int(cell.high.get("errors", 0)) + int((cell.low or {}).get("errors", 0))
            rows.append(
                [
                    SCENARIO_TITLES[scenario],
                    TARGET_TITLES[target],
                    str(cell.processes),
                    fmt(cell.high.get("cpu", {}).get("server_cores")),
                    f"{rps:,.0f}",
                    fmt(cell.high["p50_ms"]),
                    fmt(cell.high["p99_ms"]),
                    fmt(ratio) if ratio is not None else "1.00" if target == "direct" else "-",
                    fmt(_get(cell, "low", "p50_ms"), 3),
                    fmt(_get(cell, "low", "p99_ms"), 3),
                    fmt(added["p50"], 3, True),
                    fmt(added["p99"], 3, True),
                    str(errors),
                    check,
                ]
            )
    out.append(
        f"Throughput and latency. req/s, p50, p99: wrk -t{s['threads']} -c{s['connections']} "
        f"-d{s['duration']:g}s.  mod p50/p99: moderate load, wrk -t{s['low_threads']} "
        f"-c{s['low_connections']} with a pause per connection offering ~{s['low_rps']:g} req/s.  "
        f"+p50/+p99: proxy minus direct at moderate load.  Latencies in ms."
    )
    out.append("")
    out.append(rst_table(headers, rows, right={2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}))
    out.append("")
    foreign = [
        (run["cpu"]["foreign_cores"], cell)
        for cell in results.cells
        for run in (cell.high, cell.low)
        if run and "cpu" in run
    ]
    if foreign:
        worst, worst_cell = max(foreign, key=lambda x: x[0])
        mean = sum(f for f, _ in foreign) / len(foreign)
        out.append(
            f"procs: processes serving (the daemon and its children).  cpu: cores they used at "
            f"high load.  Other work on this machine during the measurements: "
            f"{mean:.2f} cores on average, at worst {worst:.2f} "
            f"({SCENARIO_TITLES[worst_cell.scenario]} / {TARGET_TITLES[worst_cell.target]})."
        )
        out.append("")

    scaling = results.scaling
    if scaling and "error" not in scaling:
        runs = ", ".join(
            f"{a:,.0f} / {b:,.0f}"
            for a, b in zip(scaling["w1_rps"], scaling["w2_rps"], strict=True)
        )
        out.append(
            f"Scaling: chat non-streaming req/s of 1 worker / 2 workers in {scaling['rounds']} "
            f"alternating runs: {runs}; medians {scaling['w1_median']:,.0f} / "
            f"{scaling['w2_median']:,.0f}, ratio {scaling['ratio']:.2f}x."
        )
        out.append("")

    latency = results.latency
    if latency and "error" not in latency:
        for key, title in (
            ("chat", "chat non-streaming, moderate load"),
            ("embed", "embeddings, moderate load"),
            ("ttfb_paced", "chat streaming, TTFB behind the paced upstream"),
        ):
            for measure, found in latency.get(key, {}).items():
                pairs = ", ".join(
                    f"{d:.3f} / {w:.3f}" for d, w in zip(found["direct"], found["w1"], strict=True)
                )
                out.append(
                    f"Alternating: {title}, {measure} of direct / 1 worker in "
                    f"{latency['rounds']} rounds: {pairs} ms; added (medians) "
                    f"{found['added_ms']:+.3f} ms."
                )
        out.append("")

    lines = []
    for target in s["targets"]:
        cell = results.cell("stream", target)
        rps = _get(cell, "high", "rps")
        if cell is None or rps is None or not cell.chunks_per_answer:
            continue
        workers = 2 if target == "w2" else 1
        total = rps * cell.chunks_per_answer
        unit = "NDJSON lines" if target == "direct" else "SSE chunks"
        per = "" if target == "direct" else f", {total / workers:,.0f} per worker"
        lines.append(
            f"* {TARGET_TITLES[target]}: {total:,.0f} {unit}/s "
            f"({rps:,.0f} answers/s x {cell.chunks_per_answer}{per})"
        )
    if lines:
        out.append("Streaming throughput")
        out.append("")
        out.extend(lines)
        out.append("")

    rows = []
    for scenario, part, how in (
        (
            "stream",
            "ttfb_paced",
            f"chat streaming, paced upstream ({s['pace_ms']:g} ms after line 1)",
        ),
        ("stream", "ttfb", "chat streaming, nginx (one burst)"),
        ("chat", "ttfb", "chat non-streaming, nginx"),
    ):
        direct_ms = _get(results.cell(scenario, "direct"), part, "ttfb_median_ms")
        for target in s["targets"]:
            cell = results.cell(scenario, target)
            value = _get(cell, part, "ttfb_median_ms")
            if value is None or cell is None:
                continue
            data = getattr(cell, part)
            rows.append(
                [
                    how,
                    TARGET_TITLES[target],
                    f"{value:.3f}",
                    fmt(value - direct_ms, 3, True)
                    if direct_ms is not None and target != "direct"
                    else "-",
                    f"{data['ttfb_p90_ms']:.3f}",
                    f"{data['total_median_ms']:.3f}",
                ]
            )
    if rows:
        out.append(
            f"Time to first byte: median (and p90) of {s['ttfb_requests']} sequential requests "
            f"on one keep-alive connection, raw socket client; ms"
        )
        out.append("")
        out.append(
            rst_table(
                ["answer", "target", "first byte", "vs direct", "p90", "whole answer"],
                rows,
                right={2, 3, 4, 5},
            )
        )
        out.append("")

    memory = results.memory
    if memory:
        out.append("Memory (fresh oproxy, workers: 1, non-streaming chat)")
        out.append("")
        if "error" in memory:
            out.append(f"* error: {memory['error']}")
        else:
            a, b = memory[str(memory["checkpoint"])], memory[str(memory["total"])]
            mb = 1.048576  # MiB to MB
            out.append(
                f"* VmRSS at start {memory['start']['rss_mib_total'] * mb:.1f} MB; "
                f"after {a['requests_done']:,} requests {a['rss_mib_total'] * mb:.1f} MB; "
                f"after {b['requests_done']:,} requests {b['rss_mib_total'] * mb:.1f} MB "
                f"({memory['change_pct']:+.1f}%); {b['processes']} process(es), the largest "
                f"{b['rss_mib_max_process'] * mb:.1f} MB; {a['run_rps']:,.0f} and "
                f"{b['run_rps']:,.0f} req/s, {a['run_errors'] + b['run_errors']} errors"
            )
        out.append("")

    out.append("Targets")
    out.append("")
    rows = []
    for c in results.criteria:
        unit = c["unit"]
        m = c["measured"]
        if m is None:
            measured = "-"
        elif unit in ("req/s", "chunks/s"):
            measured = f"{m:,.0f} {unit}"
        elif unit == "x":
            measured = f"{m:.2f}x"
        elif unit == "%":
            measured = f"{m:+.1f}%"
        else:
            measured = f"{m:.3f} {unit}" if unit == "ms" else f"{m:.1f} {unit}"
        rows.append([c["criterion"], measured, c["target"], c["verdict"]])
    out.append(rst_table(["criterion", "measured", "target", "result"], rows, right={1}))
    failed = [c for c in results.cells if c.error]
    if failed:
        out.append("")
        out.append("Errors")
        out.append("")
        for bad in failed:
            first = bad.error.strip().splitlines()[0]
            out.append(f"* {SCENARIO_TITLES[bad.scenario]} / {TARGET_TITLES[bad.target]}: {first}")
    return "\n".join(out)


# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark oproxy against a canned nginx upstream (see bench/README.rst).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s per measurement, 1 s warm-up, 20,000 requests for memory: a smoke run",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=float,
        help="seconds per wrk measurement (default 10; 3 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds of wrk warm-up before each measurement (default 2; 1 with --quick)",
    )
    parser.add_argument(
        "-t", "--threads", type=int, default=2, help="wrk threads at high load (default 2)"
    )
    parser.add_argument(
        "-c",
        "--connections",
        type=int,
        default=32,
        help="wrk connections at high load (default 32)",
    )
    parser.add_argument(
        "--low-threads", type=int, default=1, help="wrk threads at moderate load (default 1)"
    )
    parser.add_argument(
        "--low-connections",
        type=int,
        default=4,
        help="wrk connections at moderate load (default 4)",
    )
    parser.add_argument(
        "--moderate-rps",
        type=float,
        default=200.0,
        help="offered load at moderate load, requests/s in total (default 200)",
    )
    parser.add_argument(
        "--ttfb-requests", type=int, help="sequential requests for time to first byte (default 200)"
    )
    parser.add_argument(
        "--stream-lines",
        type=int,
        default=300,
        help="NDJSON lines in the streamed answer (default 300)",
    )
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=5.0,
        help="paced time-to-first-byte test: ms between the first streamed line and the rest "
        "(default 5)",
    )
    parser.add_argument("--paced-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paced-file", help=argparse.SUPPRESS)
    parser.add_argument("--paced-lifetime", type=float, default=6 * 3600, help=argparse.SUPPRESS)
    parser.add_argument(
        "--mem-requests",
        type=int,
        help="requests for the memory run (default 100,000; 20,000 with --quick)",
    )
    parser.add_argument(
        "--mem-checkpoint",
        type=int,
        help="first RSS reading after this many requests (default 10,000; 2,000 with --quick)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory run")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin processes to CPUs for the latency measurements (see README)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating runs of the two sides of each target that compares two rows "
        "(1 worker against direct, 2 workers against 1; default 3; 0: use the table's rows)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to SECONDS for other work on the machine "
        "to stop (default 0: do not wait)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory (configs, logs)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.ttfb_requests = args.ttfb_requests if args.ttfb_requests is not None else 200
    args.mem_requests = args.mem_requests or (20000 if quick else 100000)
    args.mem_checkpoint = args.mem_checkpoint or (2000 if quick else 10000)
    for name, value in (
        ("duration", args.duration),
        ("connections", args.connections),
        ("threads", args.threads),
    ):
        if value <= 0:
            parser.error(f"--{name} must be positive")
    if args.moderate_rps <= 0:
        parser.error("--moderate-rps must be positive")
    if args.duration > 600:
        parser.error("--duration is at most 600 seconds")
    if not 0 < args.mem_checkpoint < args.mem_requests <= 10_000_000:
        parser.error("need 0 < --mem-checkpoint < --mem-requests <= 10,000,000")
    args.targets = tuple(t for t in args.targets.split(",") if t)
    args.scenarios = tuple(s for s in args.scenarios.split(",") if s)
    for t in args.targets:
        if t not in TARGETS:
            parser.error(f"unknown target {t!r}")
    for sc in args.scenarios:
        if sc not in SCENARIOS:
            parser.error(f"unknown scenario {sc!r}")
    if "direct" not in args.targets:
        args.targets = ("direct", *args.targets)  # the baseline everything is compared to
    args.targets = tuple(t for t in TARGETS if t in args.targets)
    args.scenarios = tuple(sc for sc in SCENARIOS if sc in args.scenarios)
    return args


def check_tools() -> None:
    missing = [tool for tool in (NGINX, WRK) if not os.access(tool, os.X_OK)]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: apt-get install -y nginx-light wrk")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.paced_upstream:
        serve_paced(args.paced_upstream, Path(args.paced_file), args.pace_ms, args.paced_lifetime)
        return 0
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        threads=args.threads,
        connections=args.connections,
        low_threads=args.low_threads,
        low_connections=args.low_connections,
        low_rps=args.moderate_rps,
        ttfb_requests=args.ttfb_requests,
        stream_lines=args.stream_lines,
        pace_ms=args.pace_ms,
        mem_checkpoint=args.mem_checkpoint,
        mem_requests=args.mem_requests,
        targets=args.targets,
        scenarios=args.scenarios,
        memory=not args.no_memory,
        nginx_workers=args.nginx_workers,
        wait_quiet=args.wait_quiet,
        pin=not args.no_pin,
        rounds=args.rounds,
    )
    # Explicitly, since a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="oproxy-bench-"))
    keep = args.keep_tmp
    results = Results(meta={}, settings=asdict(settings))
    started = time.monotonic()
    status = 0
    try:
        check_tools()
        results.meta = environment_facts()
        busy = cpu_busy_pct()
        results.meta["cpu_busy_pct_before"] = round(busy, 1)
        if busy > 15:
            log(
                f"warning: the CPUs are already {busy:.0f}% busy before the run; "
                "other work on this machine will lower the numbers"
            )
        log(f"working directory {workdir}")
        upstream = start_nginx(procs, workdir, settings.stream_lines, settings.nginx_workers)
        log(
            f"nginx: non-streamed answers on :{upstream.plain_port}, "
            f"stream on :{upstream.stream_port}"
        )
        if "stream" in settings.scenarios and settings.ttfb_requests > 0:
            upstream.paced_port, _ = start_paced(procs, workdir, settings.pace_ms, 6 * 3600)
            log(f"paced stream upstream on :{upstream.paced_port}")
        for target in settings.targets:
            measure_target(procs, workdir, upstream, settings, results, target)
        if (
            settings.rounds > 0
            and {"w1", "w2"} <= set(settings.targets)
            and "chat" in settings.scenarios
        ):
            try:
                results.scaling = measure_scaling(procs, workdir, upstream, settings)
            except BenchError as e:
                log(f"error (scaling): {e}")
                results.scaling = {"error": str(e)}
        if settings.rounds > 0 and "w1" in settings.targets:
            try:
                results.latency = measure_latency_rounds(procs, workdir, upstream, settings)
            except BenchError as e:
                log(f"error (latency rounds): {e}")
                results.latency = {"error": str(e)}
        if settings.memory:
            try:
                results.memory = measure_memory(procs, workdir, upstream, settings)
            except BenchError as e:
                log(f"error: {e}")
                results.memory = {"error": str(e)}
        judge(results)
        results.meta["elapsed_s"] = round(time.monotonic() - started, 1)
        results.meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        print(render(results), flush=True)
        if any(c.error for c in results.cells) or (results.memory or {}).get("error"):
            status = 1
            keep = True
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        status = 130
    except BenchError as e:
        log(f"error: {e}")
        status = 1
        keep = True
    finally:
        procs.stop_all()
        if args.json and results.meta:
            payload = {
                "meta": results.meta,
                "settings": results.settings,
                "cells": [asdict(c) for c in results.cells],
                "memory": results.memory,
                "scaling": results.scaling,
                "latency": results.latency,
                "criteria": results.criteria,
            }
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
            log(f"results written to {args.json}")
        if keep:
            log(f"logs and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
