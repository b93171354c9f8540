"""
A worker's log lines reach the master in batches, whole and in order.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import task
from twisted.scripts._twistd_unix import ServerOptions

from oproxy.tap import logs_plainly_to_stdout
from oproxy.worker import BatchedLines


class ThreadedClock(task.Clock):
    """A clock that also takes calls from other threads, as a reactor does."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.from_threads.append((f, args))

    def run_thread_calls(self) -> None:
        calls, self.from_threads = self.from_threads, []
        for f, args in calls:
            f(*args)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    yield read, write
    os.close(read)
    os.close(write)


def drain(fd: int) -> list[bytes]:
    """Each ``read`` that found data: one per ``write`` the writer made."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return chunks
        chunks.append(chunk)


def test_lines_of_one_turn_are_one_write(pipe: tuple[int, int]) -> None:
    read, write = pipe
    clock = ThreadedClock()
    out = BatchedLines(clock, write)
    for n in range(3):
        out.add(f"line {n} é")
    assert drain(read) == []  # nothing until the reactor turns
    clock.advance(0)
    assert drain(read) == ["line 0 é\nline 1 é\nline 2 é\n".encode()]
    out.add("next turn")
    clock.advance(0)
    assert drain(read) == [b"next turn\n"]
    clock.advance(0)
    assert drain(read) == []


def test_lines_left_at_exit_are_written_by_flush(pipe: tuple[int, int]) -> None:
    read, write = pipe
    out = BatchedLines(ThreadedClock(), write)
    out.add("last words")
    out.flush()
    assert drain(read) == [b"last words\n"]


def test_lines_from_other_threads_join_the_reactor_s_batch(pipe: tuple[int, int]) -> None:
    read, write = pipe
    clock = ThreadedClock()
    out = BatchedLines(clock, write)
    thread = threading.Thread(target=out.add, args=("from a thread",))
    thread.start()
    thread.join()
    assert clock.getDelayedCalls() == [] and drain(read) == []
    out.add("from the reactor")
    clock.run_thread_calls()
    clock.advance(0)
    assert drain(read) == [b"from the reactor\nfrom a thread\n"]


def test_no_write_is_larger_than_pipe_buf_and_each_ends_a_line() -> None:
    # A packet socket keeps each write apart, so the test sees every one.
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    clock = ThreadedClock()
    out = BatchedLines(clock, writer.fileno())
    lines = [f"{n:04d} " + "x" * 995 for n in range(10)]  # 1,001 bytes each, with the newline
    for line in lines:
        out.add(line)
    clock.advance(0)
    reader.setblocking(False)
    writes = []
    with contextlib.suppress(BlockingIOError):
        while True:
            writes.append(reader.recv(1 << 20))
    reader.close()
    writer.close()
    assert [len(w) for w in writes] == [4004, 4004, 2002]
    assert all(w.endswith(b"\n") and len(w) <= select.PIPE_BUF for w in writes)
    assert b"".join(writes).decode().splitlines() == lines


@pytest.mark.parametrize(
    ("twistd_args", "plain_stdout"),
    [
        (["--nodaemon", "--logfile=-"], True),  # the systemd unit
        (["--nodaemon"], True),  # a terminal
        (["--nodaemon", "--logfile=oproxy.log"], False),  # twistd rotates this file
        (["--logfile=-", "--nodaemon", "--syslog"], False),
        (["--nodaemon", "--logger=oproxy.logs.json_observer"], False),  # JSON, not lines
    ],
)
def test_workers_write_their_own_lines_only_where_twistd_writes_plain_ones(
    twistd_args: list[str], plain_stdout: bool
) -> None:
    options = ServerOptions()
    options.parseOptions(
        [*twistd_args, "--pidfile=", "oproxy", "--listen", "tcp:0:interface=127.0.0.1"]
    )
    assert logs_plainly_to_stdout(options.subOptions) is plain_stdout
