"""
What a serving process does once it has started.
"""

from __future__ import annotations

import gc
import weakref

from oproxy.serving import freeze_startup_heap


class Node:
    """An object that can take part in a reference cycle."""

    other: object = None


def test_startup_objects_leave_the_collector_and_later_garbage_does_not() -> None:
    built_at_startup = Node()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert gc.is_tracked(built_at_startup)
        assert not any(obj is built_at_startup for obj in gc.get_objects())
        # A request's garbage, cycles included, is still collected.
        first, second = Node(), Node()
        first.other, second.other = second, first
        gone = weakref.ref(first)
        del first, second
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


class _Reactor:
    """Records what a signal handler hands to the reactor thread."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def callFromThread(self, f: object) -> None:
        self.calls.append(f)


def test_a_signal_right_after_binding_is_handled_not_fatal() -> None:
    """
    From ``privilegedStartService`` (the listeners just bound, the rest of
    the tree not yet started) the signal is the service's: ``SIGHUP`` sent
    as soon as the port answers used to end the daemon by its default
    action.
    """
    import os
    import signal

    from oproxy.serving import SignalService

    reactor = _Reactor()
    fatal: list[int] = []

    def default_action(signum: int, frame: object) -> None:
        fatal.append(signum)  # SIGHUP's default would have ended the process here

    before = signal.signal(signal.SIGUSR2, default_action)
    try:
        signals = SignalService(reactor, signal.SIGUSR2, lambda: None)
        signals.privilegedStartService()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert (fatal, len(reactor.calls)) == ([], 1)
        signals.startService()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert (fatal, len(reactor.calls)) == ([], 2)
        signals.stopService()
        assert signal.getsignal(signal.SIGUSR2) == default_action
    finally:
        signal.signal(signal.SIGUSR2, before)
