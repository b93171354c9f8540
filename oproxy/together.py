"""
Work run side by side, where the first failure is the answer: the rest is
cancelled rather than left running for nobody, and the failure itself is
raised (not Twisted's ``FirstError`` wrapping it), so callers handle it as
if it came from one awaited call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from twisted.internet import defer

T = TypeVar("T")


async def run_bounded(work: Sequence[Callable[[], Awaitable[T]]], concurrency: int) -> list[T]:
    """
    The results of ``work``, in order, with at most ``concurrency`` of them
    running at once; each starts only when a running one has finished.

    The first failure cancels those running and starts no more;
    cancelling the whole cancels them all.
    """
    results: list[Any] = [None] * len(work)
    waiting = iter(enumerate(work))

    async def lane() -> None:
        for index, start in waiting:
            results[index] = await start()

    lanes = [
        defer.Deferred.fromCoroutine(lane()) for _ in range(max(1, min(concurrency, len(work))))
    ]
    try:
        await defer.gatherResults(lanes, consumeErrors=True)
    except BaseException as e:
        for running in lanes:
            running.cancel()
        if isinstance(e, defer.FirstError):
            e.subFailure.raiseException()
        raise
    return results


async def all_of(coroutines: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """The results of ``coroutines``, all running at once."""
    return await run_bounded([_started(c) for c in coroutines], len(coroutines))


def _started(coroutine: Coroutine[Any, Any, T]) -> Callable[[], Awaitable[T]]:
    return lambda: coroutine
