"""
Following the JSON access log for the console.

Every worker writes its lines to the same access log, so reading that file
gives every worker the same picture, whichever one the console asks.
:class:`LogFollower` starts when the console is first used, finds where the
last hour begins by a binary search over the file (and over the file
rotated away before it, while that still holds part of the hour), reads
from there in bounded chunks in a thread and parses each chunk on the
reactor, so a console answer never waits for more than one chunk.  Then it
follows the file: new lines every couple of seconds and before each answer
(one bounded read), a rotation noticed by the file's identity (the renamed
file is still drained for a while, as writers may finish lines there), a
truncation by its size.  Left unused for ten minutes, it stops and forgets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from oproxy.console.tally import WINDOW_MINUTES, TrafficTally, seconds_of

log = Logger()

#: Bytes read (and parsed) at a time: about a hundred lines, a millisecond
#: or two of work, the longest a console answer waits while the log is read.
CHUNK_BYTES = 32 * 1024
#: Seconds between looks at the file while the console is in use.
POLL_SECONDS = 2.0
#: Seconds without a console request after which the follower stops.
IDLE_SECONDS = 600.0
#: Seconds a rotated-away file is still read (writers reopen within one).
ROTATION_GRACE = 5.0
#: Seconds the first answer waits for the last hour to be read, at most...
FIRST_WAIT = 0.005
#: ...unless it is this small (a few milliseconds of work): then it waits.
SMALL_LOG = 128 * 1024
#: Seconds the first answer waits to know where the hour begins, at most.
OPEN_WAIT = 0.03


def parse_lines(data: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of complete lines; a broken line is skipped."""
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def _line_end(record: Mapping[str, Any]) -> float | None:
    started = seconds_of(record.get("time"))
    if started is None:
        return None
    return started + (seconds_of(record.get("latency_seconds")) or 0.0)


def _first_time_after(fd: int, offset: int, size: int) -> tuple[int, float | None]:
    """
    The start of the first whole line at or after ``offset``, and when
    that line's request ended (``None``: no readable line there).
    """
    position = offset
    if offset > 0:
        # The line that covers ``offset - 1`` is cut: skip to the next one.
        position = offset - 1
        while position < size:
            data = os.pread(fd, 64 * 1024, position)
            if not data:
                return size, None
            newline = data.find(b"\n")
            if newline >= 0:
                position += newline + 1
                break
            position += len(data)
    start = position
    while position < size:
        data = os.pread(fd, 64 * 1024, position)
        if not data:
            break
        newline = data.find(b"\n")
        if newline < 0:
            return start, None  # an unfinished last line
        for record in parse_lines(data[:newline]):
            return start, _line_end(record)
        position += newline + 1
        start = position
    return start, None


def start_of_window(fd: int, size: int, since: float) -> int:
    """
    Where the lines of requests that ended at ``since`` or later begin,
    found by a binary search over the file.

    Lines are written when a request ends, by several workers at once, so
    their times are nearly but not strictly in order; the search lands
    within a few lines of the boundary, and the tally ignores what is older.
    """
    low, high = 0, size
    while high - low > 4096:
        middle = (low + high) // 2
        _, ended = _first_time_after(fd, middle, size)
        if ended is None or ended >= since:
            high = middle
        else:
            low = middle
    start, _ = _first_time_after(fd, low, size)
    return start


@dataclass
class Source:
    """An open log file and how far it has been read."""

    fd: int
    offset: int
    identity: tuple[int, int]
    #: The clock's time after which a rotated-away file is no longer read.
    retire_at: float | None = None
    #: Bytes read but not yet a whole line.
    partial: bytes = b""
    #: The file's size when it was opened.
    size: int = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def open_window(path: str, since: float) -> list[Source]:
    """
    The files holding the lines since ``since``, oldest first, each opened
    at the first such line: the rotated-away ``path.1`` when it was written
    to since then, then ``path``.  A missing ``path`` gives no source yet.
    """
    sources = []
    for candidate in (f"{path}.1", path):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        stat = os.fstat(fd)
        if candidate != path and stat.st_mtime < since:
            os.close(fd)
            continue
        offset = start_of_window(fd, stat.st_size, since)
        sources.append(Source(fd, offset, _identity(stat), size=stat.st_size))
    return sources


def read_chunk(source: Source, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``source`` from where it was left (in a thread)."""
    return os.pread(source.fd, limit, source.offset)


def file_size(source: Source) -> int:
    return os.fstat(source.fd).st_size


def identity_of(path: str) -> tuple[int, int] | None:
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def reopen(path: str) -> Source | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    return Source(fd, 0, _identity(os.fstat(fd)))


#: Runs a blocking function in a thread: ``deferToThread``, or at once in tests.
InThread = Callable[..., "defer.Deferred[Any]"]


class LogFollower:
    """
    Keep a :class:`TrafficTally` of the access log at ``path`` current while
    the console is in use.

    :param in_thread: runs file reads off the reactor thread.
    """

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        *,
        in_thread: InThread = threads.deferToThread,
        chunk: int = CHUNK_BYTES,
        poll: float = POLL_SECONDS,
        idle: float = IDLE_SECONDS,
        first_wait: float = FIRST_WAIT,
    ) -> None:
        self.path = path
        self._clock = clock
        self._in_thread = in_thread
        self._chunk = chunk
        self._poll = poll
        self._idle = idle
        self._first_wait = first_wait
        self.tally = TrafficTally()
        #: ``stopped``, ``loading`` (reading the last hour), or ``following``.
        self.state = "stopped"
        self._sources: list[Source] = []
        self._loop: task.LoopingCall | None = None
        self._reading: defer.Deferred[None] | None = None
        self._used = 0.0
        self._to_load = 0
        self._loaded = 0
        self._generation = 0

    # -- what the console calls -----------------------------------------------------

    @property
    def progress(self) -> float | None:
        """The share of the last hour read so far while loading, else ``None``."""
        if self.state != "loading":
            return None
        return min(1.0, self._loaded / self._to_load) if self._to_load else 0.0

    async def fresh(self) -> TrafficTally:
        """
        The tally, with what the file holds now when that is one chunk away;
        starts following on first use.  Never waits for more than one read.
        """
        self._used = self._clock.seconds()
        if self.state == "stopped":
            opened, loading = self._start()
            # A small hour of log is read at once: the first answer shows it
            # whole.  A big one is not waited for: the answer says how far
            # the reading got, and the page asks again.
            await first_of(opened, OPEN_WAIT, self._clock)
            if self.state == "loading" and 0 < self._to_load <= SMALL_LOG:
                await loading
            else:
                await first_of(loading, self._first_wait, self._clock)
        elif self.state == "following" and self._reading is None:
            await self._read_once(self._chunk)
        return self.tally

    def stop(self) -> None:
        """Stop following and forget (the process stops, or nobody looks)."""
        self._generation += 1
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for source in self._sources:
            source.close()
        self._sources = []
        self._reading = None
        self.tally = TrafficTally()
        self.state = "stopped"

    # -- the work ---------------------------------------------------------------------

    def _start(self) -> tuple[defer.Deferred[None], defer.Deferred[None]]:
        """Start reading the last hour: when it is found, and when it is read."""
        self.state = "loading"
        self._loaded = self._to_load = 0
        generation = self._generation
        since = self._clock.seconds() - WINDOW_MINUTES * 60 - 60
        opened: defer.Deferred[None] = defer.Deferred()

        async def load() -> None:
            try:
                sources: list[Source] = await self._in_thread(open_window, self.path, since)
            finally:
                opened.callback(None)
            if generation != self._generation:
                for source in sources:
                    source.close()
                return
            self._sources = sources
            self._to_load = sum(max(0, s.size - s.offset) for s in sources)
            while generation == self._generation:
                if not await self._read_once(self._chunk):
                    break
                # Let the reactor answer between chunks.
                await task.deferLater(self._clock, 0, lambda: None)
            if generation == self._generation:
                self.state = "following"

        loading = defer.Deferred.fromCoroutine(load())
        loading.addErrback(self._failed, "Reading the access log")
        loop = task.LoopingCall(self._tick)
        loop.clock = self._clock
        loop.start(self._poll, now=False).addErrback(self._failed, "Following the access log")
        self._loop = loop
        return opened, loading

    def _failed(self, failure: Any, what: str) -> None:
        log.failure("{what} for the console failed", failure, what=what)
        self.stop()

    def _tick(self) -> defer.Deferred[None] | None:
        if self._clock.seconds() - self._used > self._idle:
            self.stop()
            return None
        if self.state != "following" or self._reading is not None:
            return None
        return defer.Deferred.fromCoroutine(self._follow())

    async def _follow(self) -> None:
        """Read what was added, then look for a rotation."""
        generation = self._generation
        while generation == self._generation and await self._read_once(self._chunk):
            await task.deferLater(self._clock, 0, lambda: None)
        if generation != self._generation:
            return
        await self._check_rotation()

    async def _check_rotation(self) -> None:
        now = self._clock.seconds()
        for source in [s for s in self._sources if s.retire_at is not None and now >= s.retire_at]:
            source.close()
            self._sources.remove(source)
        current = self._sources[-1] if self._sources else None
        identity = await self._in_thread(identity_of, self.path)
        if identity is None or (current is not None and identity == current.identity):
            if current is not None and current.retire_at is None:
                size = await self._in_thread(file_size, current)
                if size < current.offset:  # truncated in place: start again
                    current.offset, current.partial = 0, b""
            return
        fresh = await self._in_thread(reopen, self.path)
        if fresh is None:
            return
        if current is not None:
            current.retire_at = now + ROTATION_GRACE
        self._sources.append(fresh)

    async def _read_once(self, limit: int) -> bool:
        """
        One chunk from the first source with something to read, parsed into
        the tally; whether anything was read.
        """
        if self._reading is not None:
            return False
        generation = self._generation
        reading: defer.Deferred[None] = defer.Deferred()
        self._reading = reading
        try:
            for source in list(self._sources):
                data: bytes = await self._in_thread(read_chunk, source, limit)
                if generation != self._generation:
                    return False
                if not data:
                    continue
                source.offset += len(data)
                self._loaded += len(data)
                data = source.partial + data
                cut = data.rfind(b"\n") + 1
                source.partial = data[cut:]
                for record in parse_lines(data[:cut]):
                    self.tally.add(record)
                return True
            return False
        finally:
            if self._reading is reading:
                self._reading = None
            reading.callback(None)


async def first_of(work: defer.Deferred[None], seconds: float, clock: IReactorTime) -> None:
    """Wait for ``work``, but no longer than ``seconds``; ``work`` goes on either way."""
    if work.called:
        return
    waiting: defer.Deferred[None] = defer.Deferred()

    def done(result: object) -> object:
        if not waiting.called:
            waiting.callback(None)
        return result

    timer = clock.callLater(seconds, done, None)
    work.addBoth(done)
    await waiting
    if timer.active():
        timer.cancel()
