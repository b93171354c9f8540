"""
The master's side of worker processes, over a reactor that records spawns.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.error import ProcessTerminated
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from oproxy.listeners import Listener
from oproxy.workers import WorkerPool, WorkerSpec


class Spawned:
    def __init__(self, pid: int, environment: dict[str, str]) -> None:
        self.pid = pid
        self.worker = json.loads(environment["OPROXY_WORKER"])


class SpawningClock(task.Clock):
    """A clock whose processes are only written down."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []

    def spawnProcess(self, protocol: Any, executable: str, args: Any, env: Any, **kw: Any) -> Any:
        process = Spawned(1000 + len(self.spawned), env)
        self.spawned.append(process)
        return process


@pytest.fixture
def listener() -> Iterator[Listener]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield Listener("tcp:0:interface=127.0.0.1", [sock])
    sock.close()


def test_the_master_says_where_once_and_one_worker_says_how_the_backends_are(
    listener: Listener,
) -> None:
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event))

    clock = SpawningClock()
    spec = WorkerSpec(None, (), None, ((3, listener.description),))
    pool = WorkerPool(
        clock,
        2,
        spec,
        lambda: 1.0,
        bind=lambda reactor, description, count: listener,
        make_metrics_directory=None,
    )
    globalLogPublisher.addObserver(observe)
    try:
        pool.privilegedStartService()
        pool.startService()
    finally:
        globalLogPublisher.removeObserver(observe)
    port = listener.sockets[0].getsockname()[1]
    assert [line for line in lines if "serving the OpenAI API" in line] == [
        f"oproxy 0.1.0 serving the OpenAI API at http://127.0.0.1:{port}/v1 "
        "(docs /docs, metrics /metrics) with 2 worker processes"
    ]
    assert [(p.worker["index"], p.worker["announce_backends"]) for p in clock.spawned] == [
        (0, True),
        (1, False),
    ]
    # A worker 0 started again after a crash does not say it again.
    pool._ended(0, Failure(ProcessTerminated(exitCode=1)))
    clock.advance(60)
    assert [(p.worker["index"], p.worker["announce_backends"]) for p in clock.spawned[2:]] == [
        (0, False)
    ]
