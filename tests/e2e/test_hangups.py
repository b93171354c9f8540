"""
Clients that hang up mid-stream, against the real daemon with two workers.

Each hang-up stops the model's generation and is recorded as the client's
doing: status 499 in the access lines and in ``oproxy_requests_total`` over
both workers, and no "Unhandled error" or traceback in the daemon's log.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Daemon, fake_stats, free_port, reset_fake, start_twistd, wait_for

HELLO = [{"role": "user", "content": "hi"}]

#: Route, body (the slow model: a token every 50 ms for 100 s), and what
#: marks a chunk of its stream.
STREAMS = [
    ("/v1/chat/completions", {"model": "slow", "messages": HELLO, "stream": True}, b"data: "),
    ("/v1/completions", {"model": "slow", "prompt": "hi", "stream": True}, b"data: "),
    ("/api/chat", {"model": "slow", "messages": HELLO}, b'"done":false'),
    ("/api/generate", {"model": "slow", "prompt": "hi"}, b'"done":false'),
]
ROUNDS = 2


@pytest.fixture
def two_workers(workdir: Path, fake_ollama_process: Daemon) -> Iterator[Daemon]:
    port = free_port()
    config = workdir / f"hangups-{port}.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends: [{{name: local, url: "{fake_ollama_process.url}"}}]
workers: 2
reload: {{watch: false}}
"""
    )
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, f"hangups-{port}")
    wait_for(lambda: daemon.log.read_text().count(" serving (pid ") == 2)
    yield daemon
    daemon.stop()


def start_stream(daemon: Daemon, path: str, body: object) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    payload = json.dumps(body).encode()
    connection.sendall(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return connection


def read_until(connection: socket.socket, marker: bytes, count: int) -> bytes:
    received = b""
    while received.count(marker) < count:
        data = connection.recv(65536)
        assert data, received
        received += data
    return received


def requests_by_status(url: str) -> dict[tuple[str, str], float]:
    """``oproxy_requests_total`` over every worker, by route and status."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "oproxy_requests_total":
                key = (sample.labels["route"], sample.labels["status"])
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def test_hang_ups_mid_stream_are_499s_and_no_crash(
    two_workers: Daemon, fake_ollama_process: Daemon
) -> None:
    daemon = two_workers
    reset_fake(fake_ollama_process)
    for _ in range(ROUNDS):
        # Several streams at once, so that both workers are likely to serve some.
        streams = [(start_stream(daemon, path, body), marker) for path, body, marker in STREAMS]
        for connection, marker in streams:
            head = read_until(connection, marker, 2)
            assert head.startswith(b"HTTP/1.1 200 OK"), head[:200]
        for connection, _ in streams:
            connection.close()
    hang_ups = ROUNDS * len(STREAMS)
    wait_for(lambda: fake_stats(fake_ollama_process)["aborted"] == hang_ups)
    expected = {(path, "499"): float(ROUNDS) for path, _, _ in STREAMS}
    wait_for(lambda: requests_by_status(daemon.url) == expected)
    wait_for(lambda: daemon.log.read_text().count(" 499 ") == hang_ups)
    stats = fake_stats(fake_ollama_process)
    assert (stats["completed"], stats["in_flight"]) == (0, 0)
    log = daemon.log.read_text()
    for path, _, _ in STREAMS:
        assert log.count(f'"POST {path} HTTP/1.1" 499 ') == ROUNDS
    assert "Unhandled error" not in log
    assert "Traceback" not in log
    assert "AlreadyCalledError" not in log
