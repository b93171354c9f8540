"""
Worker processes, signals and graceful stop, with real ``twistd`` processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for

# twistd exits by re-raising the signal that stopped it, as init systems expect.
STOPPED_CLEANLY = (0, -signal.SIGTERM)

CHAT = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}).encode()


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def chat(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=CHAT,
        headers={"Content-Type": "application/json", "Connection": "close", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def in_threads(work: Callable[[], object], count: int = 6) -> None:
    """Run ``work`` in ``count`` threads at once; return when all are done."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def accepts_connections(port: int) -> bool:
    """Whether a request on a new connection gets any answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return bool(s.recv(1))
    except OSError:
        return False


def log_text(daemon: Daemon) -> str:
    """The daemon's log so far (twistd opens it only after binding the port)."""
    try:
        return daemon.log.read_text()
    except FileNotFoundError:
        return ""


def served_by(log: str) -> set[int]:
    """The workers whose access log shows a chat request."""
    return {
        index
        for index in (0, 1)
        for line in log.splitlines()
        if f"worker {index}: " in line and "POST /v1/chat/completions" in line
    }


def write_config(path: Path, port: int, fake: Daemon, extra: str = "") -> None:
    path.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends: [{{name: local, url: "{fake.url}"}}]
workers: 2
drain_timeout: 20
reload: {{watch: false}}  # the SIGHUP tests must see SIGHUP reload, not the file watch
{extra}
"""
    )


@pytest.fixture
def slow_fake(workdir: Path) -> Iterator[Daemon]:
    port = free_port()
    daemon = start_twistd(
        [
            "oproxy-fake-ollama",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--token-delay",
            "0.15",
        ],
        port,
        workdir,
        f"fake-slow-{port}",
    )
    yield daemon
    daemon.stop()


def start_pool(workdir: Path, fake: Daemon) -> tuple[Daemon, Path]:
    port = free_port()
    config = workdir / f"workers-{port}.yaml"
    write_config(config, port, fake)
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, f"workers-{port}")
    wait_for(lambda: log_text(daemon).count(" serving (pid ") == 2)
    return daemon, config


@pytest.fixture
def pool(workdir: Path, fake_ollama_process: Daemon) -> Iterator[tuple[Daemon, Path]]:
    """Two workers in front of the quick fake."""
    daemon, config = start_pool(workdir, fake_ollama_process)
    yield daemon, config
    daemon.stop()


@pytest.fixture
def slow_pool(workdir: Path, slow_fake: Daemon) -> Iterator[tuple[Daemon, Path]]:
    """Two workers in front of a fake that takes a second or two per answer."""
    daemon, config = start_pool(workdir, slow_fake)
    yield daemon, config
    daemon.stop()


def test_requests_spread_over_workers(slow_pool: tuple[Daemon, Path]) -> None:
    daemon, _ = slow_pool
    results: list[int] = []
    in_threads(lambda: results.append(chat(daemon.url)), 16)
    assert results == [200] * 16
    wait_for(lambda: served_by(log_text(daemon)) == {0, 1})


def test_killed_worker_loses_no_queued_connection_and_comes_back(
    pool: tuple[Daemon, Path],
) -> None:
    daemon, _ = pool
    before = children(daemon.process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    results = [chat(daemon.url) for _ in range(20)]
    assert results == [200] * 20
    wait_for(lambda: len(children(daemon.process.pid) - {victim}) == 2)
    assert victim not in children(daemon.process.pid)
    assert [chat(daemon.url) for _ in range(4)] == [200] * 4


def stream_in_background(
    url: str, key: str | None = None
) -> tuple[threading.Thread, list[bytes], threading.Event]:
    """Read a chat stream in a thread; ``started`` is set at its first bytes."""
    received: list[bytes] = []
    started = threading.Event()
    body = json.dumps(
        {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "tell"}]}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"

    def run() -> None:
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            while chunk := response.read1(65536):
                received.append(chunk)
                started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, received, started


def test_graceful_stop_lets_a_stream_finish(slow_pool: tuple[Daemon, Path]) -> None:
    daemon, _ = slow_pool
    thread, received, started = stream_in_background(daemon.url)
    assert started.wait(10)
    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert not accepts_connections(daemon.port)
    thread.join(30)
    body = b"".join(received)
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    assert daemon.process.wait(30) in STOPPED_CLEANLY


def test_sighup_reloads_every_worker(
    pool: tuple[Daemon, Path], fake_ollama_process: Daemon
) -> None:
    daemon, config = pool
    assert chat(daemon.url) == 200
    write_config(config, daemon.port, fake_ollama_process, "auth: {keys: [{name: a, key: sk-new}]}")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: log_text(daemon).count("Configuration reloaded") == 2)
    assert [chat(daemon.url) for _ in range(6)] == [401] * 6
    assert chat(daemon.url, {"Authorization": "Bearer sk-new"}) == 200
    config.write_text("workers: [broken")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: log_text(daemon).count("keeping the running one") == 2)
    assert chat(daemon.url, {"Authorization": "Bearer sk-new"}) == 200


def test_single_process_sighup_and_graceful_stop(workdir: Path, slow_fake: Daemon) -> None:
    port = free_port()
    config = workdir / "single.yaml"
    write_config(config, port, slow_fake)
    config.write_text(config.read_text().replace("workers: 2", "workers: 1"))
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, "single")
    try:
        assert not children(daemon.process.pid)
        config.write_text(config.read_text() + "auth: {keys: [{name: a, key: sk-x}]}\n")
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "Configuration reloaded" in log_text(daemon))
        assert chat(daemon.url) == 401
        thread, received, started = stream_in_background(daemon.url, "sk-x")
        assert started.wait(10)
        daemon.process.send_signal(signal.SIGTERM)
        thread.join(30)
        assert b"".join(received).endswith(b"data: [DONE]\n\n")
        assert daemon.process.wait(30) in STOPPED_CLEANLY
    finally:
        daemon.stop()


def scrape_requests(url: str) -> float:
    """The chat request total a scrape reports (over every worker)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "oproxy_requests_total"
                and sample.labels.get("route") == "/v1/chat/completions"
            ):
                total += sample.value
    return total


def test_metrics_add_up_over_workers(pool: tuple[Daemon, Path]) -> None:
    daemon, _ = pool
    in_threads(lambda: chat(daemon.url), 20)
    wait_for(lambda: served_by(log_text(daemon)) == {0, 1})
    # Counted just after each answer left; then every scrape, answered by
    # whichever worker accepts it, must agree.
    wait_for(lambda: scrape_requests(daemon.url) == 20.0)
    assert [scrape_requests(daemon.url) for _ in range(6)] == [20.0] * 6
    victim = min(children(daemon.process.pid))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(daemon.process.pid) - {victim}) == 2)
    assert scrape_requests(daemon.url) == 20.0


def test_access_log_rotates_under_load_without_losing_a_line(
    workdir: Path, fake_ollama_process: Daemon
) -> None:
    port = free_port()
    config = workdir / f"logged-{port}.yaml"
    access = workdir / f"access-{port}.log"
    write_config(
        config,
        port,
        fake_ollama_process,
        f"access_log: {{path: '{access}', max_bytes: 8KiB, keep: 1000}}",
    )
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, f"logged-{port}")
    try:
        wait_for(lambda: log_text(daemon).count(" serving (pid ") == 2)
        sent: list[int] = []
        deadline = time.monotonic() + 3.5

        def load() -> None:
            while time.monotonic() < deadline:
                sent.append(chat(daemon.url))

        in_threads(load)
        assert set(sent) == {200}
        time.sleep(1.5)  # let every writer notice the last rotation
        files = sorted(workdir.glob(f"access-{port}.log*"))
        assert len(files) >= 3, files
        records = [orjson.loads(line) for f in files for line in f.read_bytes().splitlines()]
        assert len(records) == len(sent)
        assert all(r["path"] == "/v1/chat/completions" and r["status"] == 200 for r in records)
        assert len({r["request_id"] for r in records}) == len(sent)
    finally:
        daemon.stop()


#: How twistd starts each line it logs.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]+\] ")


def test_workers_write_their_own_lines_when_the_daemon_logs_to_stdout(
    workdir: Path, fake_ollama_process: Daemon
) -> None:
    port = free_port()
    config = workdir / f"stdout-{port}.yaml"
    write_config(config, port, fake_ollama_process)
    daemon = start_twistd(
        ["oproxy", "--config", str(config)], port, workdir, f"stdout-{port}", log_to_stdout=True
    )
    try:
        wait_for(lambda: log_text(daemon).count(" serving (pid ") == 2)
        workers = children(daemon.process.pid)
        log_fd = 4  # after the one inherited listening socket
        for pid in workers:
            assert os.readlink(f"/proc/{pid}/fd/{log_fd}") == str(daemon.log), (
                "the worker writes to the daemon's output itself"
            )
        sent: list[int] = []

        def load() -> None:
            for _ in range(20):
                sent.append(chat(daemon.url))

        in_threads(load)
        assert sent == [200] * 120
        access = "POST /v1/chat/completions"
        wait_for(lambda: log_text(daemon).count(access) == 120)
        assert served_by(log_text(daemon)) == {0, 1}
        os.kill(daemon.process.pid, signal.SIGHUP)  # the master still knows its workers
        wait_for(lambda: log_text(daemon).count("Configuration reloaded") == 2)
    finally:
        daemon.stop()
    assert daemon.process.wait(30) in STOPPED_CLEANLY
    lines = log_text(daemon).splitlines()
    assert all(LOG_LINE.match(line) for line in lines), "every line whole, none split"
    assert sum(access in line for line in lines) == 120
    assert sum("worker 0: " in line and "Main loop terminated" in line for line in lines) == 1
