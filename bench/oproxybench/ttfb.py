"""
Time to first byte, with a raw socket: sequential requests on one kept-alive
connection, timing the first and the last byte of each answer.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from typing import Any

from .common import LOOPBACK, BenchError, Request


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


def measure_ttfb(port: int, request: Request, count: int, warmup: int) -> dict[str, Any]:
    """
    ``warmup`` then ``count`` requests, one after the other: the median and
    p90 of the first byte, and the median of the whole answer, in ms.
    """
    payload = json.dumps(request.body).encode()
    raw = (
        f"POST {request.path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    client = RawClient(port)
    firsts: list[float] = []
    lasts: list[float] = []
    try:
        for i in range(warmup + count):
            try:
                status, first, last = client.request(raw)
            except (OSError, ConnectionError):
                client.close()  # one reconnect per failure, then go on
                status, first, last = client.request(raw)
            if status != 200:
                raise BenchError(f"TTFB request to {request.path} answered HTTP {status}")
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
