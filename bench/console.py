#!/usr/bin/env python3
"""
How fast the admin console's JSON answers with a big access log:
``python bench/console.py [--lines 100000] [--workers 2] [--rounds 300]``.

It writes an access log of ``--lines`` requests spread over the last hour
(as a busy gateway's workers would have), starts the fake Ollama and a real
``twistd -n oproxy`` with ``--workers`` workers on that log, signs in with an
admin key, and times the console's JSON answers over fresh connections (so
every worker answers its share): the very first ones after the start
included, which is when each worker starts reading the last hour of the
log.  The console's requirement is an answer within 50 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

LOOPBACK = "127.0.0.1"
ADMIN_KEY = "sk-bench-console-admin-0123456789"
#: What a console must answer within.
REQUIREMENT_MS = 50.0
ENDPOINTS = (
    "/ui/api/dashboard",
    "/ui/api/requests",
    "/ui/api/requests?status=5xx&limit=100",
    "/ui/api/keys",
)

KEYS = ("search", "notebooks", "ci", "support-bot", "analytics", "alice", "bob", "evals")
MODELS = ("llama3.2", "qwen3", "mistral-small", "phi4-mini", "gemma3", "llava", "all-minilm")
PATHS = ("/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings", "/api/chat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a process exited with {process.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listened on port {port} within {seconds:g}s")


def records(count: int, now: float, seed: int = 13) -> Iterator[bytes]:
    """``count`` access log lines, oldest first, over the last hour."""
    rng = random.Random(seed)
    start = now - 3550.0
    for n in range(count):
        ended = start + 3540.0 * n / count
        latency = round(rng.lognormvariate(-0.6, 0.8), 6)
        status = rng.choices((200, 400, 401, 429, 502, 499), (930, 15, 10, 25, 12, 8))[0]
        streamed = rng.random() < 0.6
        line = {
            "time": round(ended - latency, 6),
            "request_id": f"req_{n:032x}",
            "key": rng.choice(KEYS),
            "client": f"10.0.0.{rng.randint(2, 250)}",
            "method": "POST",
            "path": rng.choice(PATHS),
            "model": rng.choice(MODELS) if status < 400 else "-",
            "backend": rng.choice(("gpu-a", "gpu-b", "cpu")) if status < 400 else "-",
            "status": status,
            "latency_seconds": latency,
            "first_token_seconds": round(latency * rng.uniform(0.05, 0.3), 6)
            if streamed and status == 200
            else None,
            "prompt_tokens": rng.randint(20, 2000) if status == 200 else None,
            "completion_tokens": rng.randint(1, 800) if status == 200 else None,
            "cache": None,
            "error": None if status < 400 else "error",
        }
        yield json.dumps(line, separators=(",", ":")).encode() + b"\n"


def write_log(path: Path, count: int) -> int:
    with open(path, "wb") as f:
        for line in records(count, time.time()):
            f.write(line)
    return path.stat().st_size


def twistd() -> str:
    beside = Path(sys.executable).parent / "twistd"
    return str(beside) if beside.exists() else (shutil.which("twistd") or "twistd")


class Console:
    """A signed-in client that opens a fresh connection for every request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie = ""

    def _request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[http.client.HTTPResponse, bytes]:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        if self.cookie:
            headers["Cookie"] = f"oproxy_console={self.cookie}"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response, data

    def sign_in(self) -> None:
        form = urlencode({"key": ADMIN_KEY, "next": "/ui/"}).encode()
        response, _ = self._request(
            "POST",
            "/ui/login",
            form,
            **{"Content-Type": "application/x-www-form-urlencoded"},
        )
        for name, value in response.getheaders():
            if name.lower() == "set-cookie" and value.startswith("oproxy_console="):
                self.cookie = value.split(";", 1)[0].split("=", 1)[1]
        if not self.cookie:
            raise SystemExit(f"sign-in failed: HTTP {response.status}")

    def timed(self, path: str) -> tuple[float, dict[str, Any]]:
        """Milliseconds from sending the request to having read the whole answer."""
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        connection.connect()  # the connection is not the console's time
        started = time.perf_counter()
        connection.request("GET", path, headers={"Cookie": f"oproxy_console={self.cookie}"})
        response = connection.getresponse()
        data = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        connection.close()
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}: {data[:200]!r}")
        return elapsed, json.loads(data)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=300, help="timed answers after the first")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    arguments = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="oproxy-console-bench-"))
    processes: list[subprocess.Popen[bytes]] = []
    environment = {**os.environ, "XDG_STATE_HOME": str(workdir / "state")}
    try:
        log = workdir / "access.jsonl"
        size = write_log(log, arguments.lines)
        fake_port, port = free_port(), free_port()
        fake = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", f"--logfile={workdir / 'fake.log'}",
             "oproxy-fake-ollama", "--listen", f"tcp:{fake_port}:interface={LOOPBACK}"],
            cwd=workdir, env=environment,
        )  # fmt: skip
        processes.append(fake)
        wait_for_port(fake_port, fake)
        config = workdir / "oproxy.yaml"
        config.write_text(
            f'listen: ["tcp:{port}:interface={LOOPBACK}"]\n'
            f"workers: {arguments.workers}\n"
            f'backends: [{{name: local, type: ollama, url: "http://{LOOPBACK}:{fake_port}"}}]\n'
            f'auth: {{keys: [{{name: bench-admin, key: "{ADMIN_KEY}", admin: true}}]}}\n'
            f'access_log: {{path: "{log}", max_bytes: 1GiB}}\n'
        )
        started = time.monotonic()
        daemon = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", f"--logfile={workdir / 'oproxy.log'}",
             "oproxy", "--config", str(config)],
            cwd=workdir, env=environment,
        )  # fmt: skip
        processes.append(daemon)
        wait_for_port(port, daemon)
        console = Console(port)
        console.sign_in()

        # The first answers after the start: each worker begins reading the
        # last hour when it is first asked.
        first: dict[str, float] = {}
        loading_seen = 0
        for path in ENDPOINTS * max(2, arguments.workers):
            elapsed, answer = console.timed(path)
            first.setdefault(path, elapsed)
            first[f"{path} (max of the first {arguments.workers * 2})"] = max(
                first.get(f"{path} (max of the first {arguments.workers * 2})", 0.0), elapsed
            )
            state = answer.get("access_log") if isinstance(answer, dict) else None
            if isinstance(state, dict) and state.get("loading"):
                loading_seen += 1
        # Until every worker has read the hour (answers say "loading" meanwhile).
        loaded_after = None
        for _ in range(2000):
            _, answer = console.timed("/ui/api/dashboard")
            states = [answer["access_log"]["loading"]]
            for _ in range(arguments.workers * 3):
                _, again = console.timed("/ui/api/dashboard")
                states.append(again["access_log"]["loading"])
            if not any(states):
                loaded_after = time.monotonic() - started
                break
            time.sleep(0.05)
        times: dict[str, list[float]] = {path: [] for path in ENDPOINTS}
        counted = 0
        for n in range(arguments.rounds):
            path = ENDPOINTS[n % len(ENDPOINTS)]
            elapsed, answer = console.timed(path)
            times[path].append(elapsed)
            if path == "/ui/api/dashboard":
                counted = answer["hour"]["total"]["requests"]
        everything = [t for values in times.values() for t in values]
        results = {
            "lines": arguments.lines,
            "log_bytes": size,
            "workers": arguments.workers,
            "first_answers_ms": {k: round(v, 2) for k, v in first.items()},
            "answers_while_loading": loading_seen,
            "seconds_until_every_worker_read_the_hour": round(loaded_after, 2)
            if loaded_after is not None
            else None,
            "requests_in_the_last_hour": counted,
            "steady_ms": {
                path: {
                    "n": len(values),
                    "p50": round(statistics.median(values), 2),
                    "p95": round(percentile(values, 0.95), 2),
                    "p99": round(percentile(values, 0.99), 2),
                    "max": round(max(values), 2),
                }
                for path, values in times.items()
            },
            "slowest_ms": round(max([*everything, *first.values()]), 2),
        }
        results["within_requirement"] = results["slowest_ms"] <= REQUIREMENT_MS
        if arguments.json:
            print(json.dumps(results, indent=2))
        else:
            report(results)
        return 0 if results["within_requirement"] else 1
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    print(
        f"access log: {r['lines']} lines, {r['log_bytes'] / 1e6:.1f} MB; "
        f"workers: {r['workers']}; requirement: every answer within {REQUIREMENT_MS:g} ms"
    )
    print("\nFirst answers after the start (ms):")
    for path, value in r["first_answers_ms"].items():
        print(f"  {path:<58} {value:8.2f}")
    print(f"  answers that said the log was still being read: {r['answers_while_loading']}")
    print(
        f"  every worker had read the hour after: {r['seconds_until_every_worker_read_the_hour']} s"
    )
    counted = r["requests_in_the_last_hour"]
    print(f"  requests in the last hour, as the dashboard counts them: {counted}")
    print("\nAnswers once read (ms):")
    print(f"  {'endpoint':<40} {'n':>5} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    for path, s in r["steady_ms"].items():
        print(f"  {path:<40} {s['n']:>5} {s['p50']:>8} {s['p95']:>8} {s['p99']:>8} {s['max']:>8}")
    verdict = "within" if r["within_requirement"] else "NOT within"
    print(f"\nSlowest answer: {r['slowest_ms']} ms: {verdict} {REQUIREMENT_MS:g} ms")


if __name__ == "__main__":
    sys.exit(main())
