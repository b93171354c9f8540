"""
Reloading: validate, swap atomically, keep the running config on a bad file,
and let go of a cache the new configuration replaces.
"""

from __future__ import annotations

from typing import Any

from attrs import evolve

from oproxy.cache import ResponseCache
from oproxy.config import CacheConfig, ConfigError
from oproxy.reload import Reloader
from tests.conftest import Proxy


class RecordingCache(ResponseCache):
    """A cache that remembers being closed."""

    closed = False

    async def close(self) -> None:
        self.closed = True


def reloader(proxy: Proxy, load: Any, retired: list[ResponseCache] | None = None) -> Reloader:
    return Reloader(
        proxy.app,
        load,
        lambda config: proxy.app.router,
        lambda config: RecordingCache(proxy.app.cache.store_backend, proxy.app.clock),
        retire_cache=(retired if retired is not None else []).append,
    )


def test_a_replaced_cache_is_handed_over_to_be_closed_and_a_kept_one_is_not(
    proxy: Proxy,
) -> None:
    original = RecordingCache(proxy.app.cache.store_backend, proxy.app.clock)
    proxy.app.swap(proxy.app.config, proxy.app.router, original)
    same = proxy.app.config
    retired: list[ResponseCache] = []
    assert reloader(proxy, lambda: same, retired).reload()
    assert proxy.app.cache is original and not retired
    changed = evolve(same, cache=CacheConfig(enabled=False))
    assert reloader(proxy, lambda: changed, retired).reload()
    assert proxy.app.cache is not original
    # The process's tree closes it (tests/test_tap.py sees that it does).
    assert retired == [original] and not original.closed
    assert proxy.app.config is changed


def test_a_bad_file_keeps_the_running_configuration(proxy: Proxy) -> None:
    running = proxy.app.config

    def broken() -> Any:
        raise ConfigError("cache.backend", "must be memory or redis")

    assert not reloader(proxy, broken).reload()
    assert proxy.app.config is running


def test_closing_a_memory_store_empties_it() -> None:
    from twisted.internet import defer, task

    from oproxy.cache import MemoryStore

    store = MemoryStore(task.Clock(), 1024)
    defer.Deferred.fromCoroutine(store.set("k", b"value", 60))
    assert len(store) == 1
    defer.Deferred.fromCoroutine(store.close())
    assert len(store) == 0 and store.size == 0
