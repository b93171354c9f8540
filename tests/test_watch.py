"""
The config file watch: a change is acted on once it has settled, renames and
symlink swaps count, a vanished file is ignored, and a bad file keeps the
running configuration.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from twisted.application import service
from twisted.internet import task
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher

from oproxy.config import ConfigError, ReloadConfig, load_config
from oproxy.reload import Reloader
from oproxy.tap import add_config_watcher, load_configuration
from oproxy.watch import ConfigWatcher
from tests.conftest import Proxy

INTERVAL = 2.0


class Calls:
    """A reload entry point that counts how often it ran."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def events() -> Iterator[list[LogEvent]]:
    seen: list[LogEvent] = []
    observer = cast(ILogObserver, seen.append)
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def messages(events: list[LogEvent], level: LogLevel | None = None) -> list[str]:
    """What the watch and the reloader said, at ``level`` if given."""
    return [
        formatEvent(e)
        for e in events
        if e.get("log_namespace") in ("oproxy.watch", "oproxy.reload")
        and (level is None or e.get("log_level") == level)
    ]


_mtime = [1_700_000_000_000_000_000]


def write(path: Path, text: str) -> None:
    """
    Write ``text`` with a modification time of its own, as a write a moment
    later would have: the test must not depend on the filesystem's clock.
    """
    path.write_text(text)
    _mtime[0] += 1_000_000_000
    os.utime(path, ns=(_mtime[0], _mtime[0]))


def watching(path: Path) -> tuple[ConfigWatcher, task.Clock, Calls]:
    clock = task.Clock()
    calls = Calls()
    watcher = ConfigWatcher(str(path), calls, clock, INTERVAL)
    watcher.startService()
    return watcher, clock, calls


def polls(clock: task.Clock, count: int = 1) -> None:
    for _ in range(count):
        clock.advance(INTERVAL)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "oproxy.yaml"
    write(path, "workers: 1\n")
    return path


def test_a_change_is_acted_on_once_it_has_settled(config_file: Path) -> None:
    _, clock, calls = watching(config_file)
    write(config_file, "workers: 1\ndrain_timeout: 5\n")
    polls(clock)
    assert calls.count == 0, "read at the first sight of a change: maybe half-written"
    polls(clock)
    assert calls.count == 1
    polls(clock, 5)
    assert calls.count == 1, "one change, one reload"


def test_an_unchanged_file_is_never_reloaded(config_file: Path) -> None:
    _, clock, calls = watching(config_file)
    polls(clock, 20)
    assert calls.count == 0


def test_a_file_still_being_written_is_not_read(config_file: Path) -> None:
    _, clock, calls = watching(config_file)
    for part in ("work", "workers: ", "workers: 1\ndrain"):
        write(config_file, part)
        polls(clock)
        assert calls.count == 0
    polls(clock)
    assert calls.count == 1


def test_a_same_size_rewrite_is_seen_by_its_time(config_file: Path) -> None:
    _, clock, calls = watching(config_file)
    write(config_file, "workers: 2\n")
    polls(clock, 2)
    assert calls.count == 1


def test_a_file_renamed_over_the_old_one_is_seen(config_file: Path) -> None:
    _, clock, calls = watching(config_file)
    before = config_file.stat()
    # What an editor does: write a sibling and rename it over the original.
    # Same size and time: only the inode tells them apart.
    sibling = config_file.with_name("oproxy.yaml.swp")
    sibling.write_text("workers: 3\n")
    os.utime(sibling, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(sibling, config_file)
    polls(clock, 2)
    assert calls.count == 1


def test_a_swapped_symlink_is_followed(tmp_path: Path) -> None:
    # A Kubernetes ConfigMap: the file is reached through a symlink to a
    # directory that is replaced as a whole.
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        write(tmp_path / version / "oproxy.yaml", "workers: 1\n")
    (tmp_path / "..data").symlink_to("v1")
    link = tmp_path / "oproxy.yaml"
    link.symlink_to("..data/oproxy.yaml")
    _, clock, calls = watching(link)
    polls(clock, 3)
    assert calls.count == 0
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    polls(clock, 2)
    assert calls.count == 1


def test_a_vanished_file_is_reported_once_and_then_seen_again(
    config_file: Path, events: list[LogEvent]
) -> None:
    _, clock, calls = watching(config_file)
    config_file.unlink()
    polls(clock, 10)
    assert calls.count == 0, "nothing to load: the running configuration stays"
    warnings = messages(events, LogLevel.warn)
    assert len(warnings) == 1
    assert str(config_file) in warnings[0] and "keeping the running configuration" in warnings[0]
    write(config_file, "workers: 1\ndrain_timeout: 9\n")
    polls(clock)
    assert calls.count == 0
    assert any("is back" in m for m in messages(events, LogLevel.info))
    polls(clock)
    assert calls.count == 1
    config_file.unlink()
    polls(clock, 3)
    assert len(messages(events, LogLevel.warn)) == 2, "reported again after it came back"


def test_a_file_missing_at_start_is_loaded_when_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "later.yaml"
    _, clock, calls = watching(path)
    polls(clock, 3)
    assert calls.count == 0
    write(path, "workers: 1\n")
    polls(clock, 2)
    assert calls.count == 1


def test_a_file_moved_away_and_back_is_not_reloaded(config_file: Path) -> None:
    _, clock, calls = watching(config_file)
    aside = config_file.with_name("aside.yaml")
    config_file.rename(aside)
    polls(clock, 2)
    aside.rename(config_file)
    polls(clock, 3)
    assert calls.count == 0


def test_a_failing_reload_does_not_stop_the_watch(
    config_file: Path, events: list[LogEvent]
) -> None:
    clock = task.Clock()
    attempts: list[int] = []

    def explode() -> None:
        attempts.append(1)
        raise RuntimeError("boom")

    ConfigWatcher(str(config_file), explode, clock, INTERVAL).startService()
    write(config_file, "workers: 2\n")
    polls(clock, 2)
    write(config_file, "workers: 3\n")
    polls(clock, 2)
    assert len(attempts) == 2
    assert any(e.get("log_failure") is not None for e in events)


def test_stopping_stops_the_polls(config_file: Path) -> None:
    watcher, clock, calls = watching(config_file)
    watcher.stopService()
    assert not clock.getDelayedCalls()
    write(config_file, "workers: 2\n")
    polls(clock, 3)
    assert calls.count == 0


def test_a_bad_file_is_reloaded_refused_and_named_in_the_log(
    proxy: Proxy, tmp_path: Path, events: list[LogEvent]
) -> None:
    """
    The watch calls the same reload as ``SIGHUP``: a bad file is validated,
    refused, and the running configuration stays; a good one goes live.
    """
    path = tmp_path / "live.yaml"
    backend = f"backends: [{{name: local, url: '{proxy.fake_url}'}}]\n"
    write(path, backend)
    reloader = Reloader(
        proxy.app,
        lambda: load_configuration(str(path)),
        lambda config: proxy.app.router,
        lambda config: proxy.app.cache,
        retire_cache=lambda cache: None,
        source=str(path),
    )
    clock = task.Clock()
    ConfigWatcher(str(path), reloader.reload, clock, INTERVAL).startService()
    running = proxy.app.config

    write(path, backend + "limits: {max_body_bytes: -1}\n")
    polls(clock, 2)
    assert proxy.app.config is running
    [refusal] = messages(events, LogLevel.error)
    assert str(path) in refusal
    assert "keeping the running one" in refusal
    assert "limits.max_body_bytes" in refusal, "the ConfigError says what is wrong"

    write(path, backend + "limits: {max_body_bytes: 4KiB}\n")
    polls(clock, 2)
    assert proxy.app.config.limits.max_body_bytes == 4096
    assert any(f"reloaded from {path}" in m for m in messages(events, LogLevel.info))


def test_reload_settings_are_parsed() -> None:
    assert load_config("", {}).reload == ReloadConfig(watch=True, interval=2.0)
    assert load_config("reload: {watch: false, interval: 0.5}", {}).reload == ReloadConfig(
        watch=False, interval=0.5
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("reload: {interval: 0}", "reload.interval"),
        ("reload: {watch: maybe}", "reload.watch"),
        ("reload: {every: 2}", "reload.every"),
    ],
)
def test_bad_reload_settings(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(text, {})
    assert raised.value.key == key


@pytest.mark.parametrize(
    ("path", "settings", "watched"),
    [
        ("oproxy.yaml", ReloadConfig(), True),
        (None, ReloadConfig(), False),
        ("oproxy.yaml", ReloadConfig(watch=False), False),
    ],
)
def test_only_a_given_file_is_watched_and_only_when_asked(
    path: str | None, settings: ReloadConfig, watched: bool
) -> None:
    from attrs import evolve

    top = service.MultiService()
    config = evolve(load_config(None, {}), reload=settings)
    add_config_watcher(top, path, config, task.Clock(), Calls())
    watchers = [s for s in top if isinstance(s, ConfigWatcher)]
    assert bool(watchers) == watched
    if watchers:
        assert watchers[0].path == path and watchers[0].interval == settings.interval
