"""
What every part of the harness shares: where things are, what a run
measures (scenarios, targets, settings), and how it reports progress.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent.parent
#: The entry point; the paced upstream runs as ``run.py --paced-upstream PORT``.
RUN_PY = BENCH_DIR / "run.py"
LUA_DIR = BENCH_DIR / "wrk"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
LOOPBACK = "127.0.0.1"

# The conversation every request has, and the canned answer to it.
CHAT_MODEL = "llama3.2"
EMBED_MODEL = "all-minilm"
EMBED_DIMS = 384
QUESTION = "Why is the sky blue?"
EMBED_TEXT = "The quick brown fox jumps over the lazy dog"
ANSWER = (
    "The sky looks blue because molecules in the air scatter short blue wavelengths "
    "of sunlight much more strongly than long red ones, an effect called Rayleigh scattering."
)

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
    """Progress, on stderr: stdout is kept for the results."""
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


class Request(NamedTuple):
    """What wrk and the other clients send: a path, and a JSON body to POST."""

    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Load:
    """
    How wrk pushes: ``threads`` and ``connections``, and with ``delay_ms``
    a pause per connection before each request (moderate load: wrk has no
    fixed-rate mode).
    """

    threads: int
    connections: int
    delay_ms: float = 0.0


@dataclass
class Settings:
    """One run's settings, as given on the command line (and written to the JSON)."""

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

    @property
    def high_load(self) -> Load:
        return Load(self.threads, self.connections)

    @property
    def moderate_load(self) -> Load:
        """The pause per connection that offers about ``low_rps`` requests/s in total."""
        return Load(
            self.low_threads, self.low_connections, self.low_connections / self.low_rps * 1000.0
        )
