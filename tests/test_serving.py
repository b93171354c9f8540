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
