"""
The fake upstreams: nginx serving canned Ollama-native answers (costs next to
nothing, so the proxy's own cost shows), and a paced upstream that sends the
first line of a stream alone, as a model does, for time to first byte.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

from .common import (
    ANSWER,
    BENCH_DIR,
    CHAT_MODEL,
    EMBED_DIMS,
    EMBED_MODEL,
    LOOPBACK,
    NGINX,
    RUN_PY,
    BenchError,
)
from .processes import Processes, free_port, wait_for_port


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
    """nginx's two ports (non-streamed and streamed ``/api/chat``), and the paced one."""

    plain_port: int
    stream_port: int
    process: subprocess.Popen[bytes]
    stream_lines: int
    paced_port: int | None = None


def start_nginx(procs: Processes, workdir: Path, stream_lines: int, workers: int) -> Upstream:
    """Write the answers and nginx's configuration under ``workdir``, start it, wait for it."""
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
    # The health probe's GET /api/version and /api/ps, and /api/tags: a
    # backend that fails its probes is taken out of service.
    answers = {
        name: (stream_file.parent / name).read_bytes()
        for name in ("version", "ps", "tags")
        if (stream_file.parent / name).exists()
    }
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
                    sock.sendall(_canned_or_missing(head, answers, date))
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


def _canned_or_missing(head: bytes, answers: dict[str, bytes], date: bytes) -> bytes:
    """A canned ``GET /api/NAME`` answer, as nginx serves it, else Ollama's 404."""
    match = re.match(rb"GET /api/(\w+) ", head)
    body = answers.get(match.group(1).decode()) if match else None
    status, kind = b"200 OK", b"application/json; charset=utf-8"
    if body is None:
        status, kind, body = b"404 Not Found", b"text/plain", b"404 page not found"
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: "
        + kind
        + b"\r\nDate: "
        + date
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


def start_paced(
    procs: Processes, workdir: Path, pace_ms: float, lifetime: float
) -> tuple[int, subprocess.Popen[bytes]]:
    """Start :func:`serve_paced` as its own process, on nginx's stream answer."""
    port = free_port()
    log_path = workdir / "paced.out"
    process = procs.start(
        [
            sys.executable,
            str(RUN_PY),
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
