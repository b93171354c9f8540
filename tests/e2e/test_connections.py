"""
The daemon under a connection flood: a client at its connection cap is
refused while health checks from elsewhere are answered, and connections
that trickle a request head are answered ``408`` and closed.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: oproxy\r\n\r\n"


@pytest.fixture
def capped(workdir: Path, fake_ollama_process: Daemon) -> Iterator[Daemon]:
    port = free_port()
    config = workdir / "capped.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends: [{{name: local, url: "{fake_ollama_process.url}"}}]
limits:
  head_timeout: 1
  max_connections: 64
  max_connections_per_client: 4
"""
    )
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, "capped")
    yield daemon
    daemon.stop()


def connect(daemon: Daemon, source: str) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", daemon.port), timeout=10, source_address=(source, 0)
    )
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer with a ``Content-Length``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def healthz(daemon: Daemon, source: str) -> bytes:
    with connect(daemon, source) as sock:
        sock.sendall(HEALTHZ)
        return read_answer(sock)


def hold(daemon: Daemon, source: str) -> socket.socket:
    """
    A connection that was answered and stays open.

    The daemon frees a closed connection's slot when it sees it closed
    (the start-up probe's, a moment after it is gone): until then a new one
    may be refused, and is tried again.
    """
    held: list[socket.socket] = []

    def answered() -> bool:
        sock = connect(daemon, source)
        try:
            sock.sendall(HEALTHZ)
            if read_answer(sock).startswith(b"HTTP/1.1 200 OK"):
                held.append(sock)
                return True
        except (AssertionError, OSError):
            pass
        sock.close()
        return False

    wait_for(answered)
    return held[0]


def closed_without_a_word(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_client_at_its_cap_leaves_health_checks_alone(capped: Daemon) -> None:
    # Four kept-alive connections from 127.0.0.1, idle after an answer:
    # every slot that address has.
    held = [hold(capped, "127.0.0.1") for _ in range(4)]
    with connect(capped, "127.0.0.1") as refused:
        refused.sendall(HEALTHZ)
        assert closed_without_a_word(refused)
    assert healthz(capped, "127.0.0.2").startswith(b"HTTP/1.1 200 OK")
    for sock in held:
        sock.close()
    # The slots come back once the connections are gone.
    wait_for(lambda: healthz_or_none(capped, "127.0.0.1") is not None)
    wait_for(lambda: "max_connections_per_client (4) reached" in capped.log.read_text())
    log = capped.log.read_text()
    assert log.count("Refusing connections from 127.0.0.1") == 1
    refused = re.search(
        r'oproxy_connections_refused_total\{reason="max_connections_per_client"\} (\S+)',
        scrape(capped, "127.0.0.2"),
    )
    assert refused is not None and float(refused.group(1)) >= 1


def healthz_or_none(daemon: Daemon, source: str) -> bytes | None:
    try:
        answer = healthz(daemon, source)
    except (AssertionError, OSError):
        return None
    return answer if answer.startswith(b"HTTP/1.1 200 OK") else None


def scrape(daemon: Daemon, source: str) -> str:
    with connect(daemon, source) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: oproxy\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def test_trickled_request_heads_are_answered_408_and_closed(capped: Daemon) -> None:
    slow = [connect(capped, "127.0.0.3") for _ in range(3)]
    received = {sock: b"" for sock in slow}
    ended: set[socket.socket] = set()
    for sock in slow:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.setblocking(False)
    line = 0

    def trickle() -> bool:
        """One more header line each; true once every connection has ended."""
        nonlocal line
        line += 1
        for sock in slow:
            if sock in ended:
                continue
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                chunk = None
            except ConnectionResetError:
                chunk = b""
            if chunk == b"":
                ended.add(sock)
                continue
            if chunk:
                received[sock] += chunk
            with contextlib.suppress(OSError):
                sock.send(b"X-Slow-%d: 1\r\n" % line)
        time.sleep(0.1)
        return len(ended) == len(slow)

    wait_for(trickle, seconds=20)
    for sock in slow:
        assert received[sock].startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received[sock]
        assert b'"code":"request_timeout"' in received[sock]
        sock.close()
    metrics = scrape(capped, "127.0.0.2")
    assert 'oproxy_request_read_timeouts_total{phase="head"} 3.0' in metrics
    assert "oproxy_connections_open 1.0" in metrics, "the scrape's own connection"
