"""
Reloading when the config file changes on disk, with a real ``twistd -n
oproxy`` master, two workers and the fake Ollama.

The daemon looks at its file every 0.2 seconds (``reload.interval``), so a
change is live well within a second.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for

KEY = "sk-hot-reload"
RELOADED = "Configuration reloaded from "
REFUSED = "keeping the running one"


def chat(url: str, key: str | None = None, content: str = "hi") -> int:
    """One chat request on a connection of its own: the kernel picks the worker."""
    body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": content}]})
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body.encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def log_text(daemon: Daemon) -> str:
    try:
        return daemon.log.read_text()
    except FileNotFoundError:
        return ""


def workers_saying(text: str, log: str) -> list[int]:
    """Which worker said ``text``, once for each time it said it."""
    return [
        int(match.group(1))
        for line in log.splitlines()
        if text in line and (match := re.search(r"worker (\d+): ", line))
    ]


def served_by(log: str) -> set[int]:
    """The workers whose (Twisted) access lines show a chat request."""
    return set(workers_saying("POST /v1/chat/completions", log))


def render(port: int, fake: Daemon, extra: str = "") -> str:
    return f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends: [{{name: local, url: "{fake.url}"}}]
workers: 2
drain_timeout: 5
reload: {{watch: true, interval: 0.2}}
{extra}
"""


def replace_file(path: Path, text: str) -> None:
    """Write a sibling and rename it over ``path``, as editors do."""
    sibling = path.with_name(path.name + ".new")
    sibling.write_text(text)
    os.replace(sibling, path)


class Pool:
    """The daemon, its config file, and what writes that file."""

    def __init__(self, daemon: Daemon, config: Path, fake: Daemon) -> None:
        self.daemon = daemon
        self.config = config
        self.fake = fake

    def write(self, extra: str, *, rename: bool = False) -> None:
        text = render(self.daemon.port, self.fake, extra)
        if rename:
            replace_file(self.config, text)
        else:
            self.config.write_text(text)

    def log(self) -> str:
        return log_text(self.daemon)

    def reloads(self) -> int:
        return len(workers_saying(RELOADED, self.log()))


@pytest.fixture
def pool(workdir: Path, fake_ollama_process: Daemon) -> Iterator[Pool]:
    port = free_port()
    config = workdir / f"hot-{port}.yaml"
    config.write_text(render(port, fake_ollama_process))
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, f"hot-{port}")
    try:
        wait_for(lambda: log_text(daemon).count(" serving (pid ") == 2)
        yield Pool(daemon, config, fake_ollama_process)
    finally:
        daemon.stop()


def burst(url: str, count: int = 24, key: str | None = None, content: str = "hi") -> list[int]:
    """Concurrent requests, each on a new connection, so both workers get some."""
    with ThreadPoolExecutor(8) as executor:
        return list(executor.map(lambda _: chat(url, key, content), range(count)))


def test_a_changed_file_reloads_every_worker(pool: Pool) -> None:
    url = pool.daemon.url
    assert burst(url) == [200] * 24
    pool.write(f"auth: {{keys: [{{name: a, key: {KEY}}}]}}")
    wait_for(lambda: sorted(workers_saying(RELOADED, pool.log())) == [0, 1])
    log = pool.log()
    # Only the master watches: one line saying it saw the change, none from a worker.
    changed = [line for line in log.splitlines() if "changed; reloading" in line]
    assert len(changed) == 1 and str(pool.config) in changed[0]
    assert workers_saying("changed; reloading", log) == []
    before = len(log)
    assert burst(url) == [401] * 24, "a worker still serves without keys"
    assert burst(url, key=KEY) == [200] * 24
    wait_for(lambda: served_by(pool.log()[before:]) == {0, 1})


def test_a_bad_file_keeps_the_last_good_configuration(pool: Pool) -> None:
    url = pool.daemon.url
    big = "x" * 8192
    pool.write("limits: {max_body_bytes: 4KiB}", rename=True)
    wait_for(lambda: pool.reloads() == 2)
    assert set(burst(url, content=big)) == {413}
    pool.write("limits: {max_body_bytes: -1}")
    wait_for(lambda: len(workers_saying(REFUSED, pool.log())) == 2)
    refusals = [line for line in pool.log().splitlines() if REFUSED in line]
    for line in refusals:
        assert str(pool.config) in line, "the log names the file"
        assert "limits.max_body_bytes: must be" in line, "and says what is wrong with it"
    before = len(pool.log())
    assert set(burst(url, content=big)) == {413}, "the last good limit still holds"
    assert burst(url) == [200] * 24
    wait_for(lambda: served_by(pool.log()[before:]) == {0, 1})
    assert pool.daemon.process.poll() is None
    # Fixed: live again.
    pool.write("limits: {max_body_bytes: 1MiB}")
    wait_for(lambda: pool.reloads() == 4)
    assert burst(url, content=big) == [200] * 24


def test_reloading_under_load_fails_no_request(pool: Pool) -> None:
    url = pool.daemon.url
    keys = f"{{name: steady, key: {KEY}}}"
    pool.write(f"auth: {{keys: [{keys}]}}")
    wait_for(lambda: pool.reloads() == 2)
    results: list[int] = []
    errors: list[OSError] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(chat(url, KEY))
            except OSError as e:  # refused, reset, timed out: a failure too
                results.append(-1)
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(1, 6):
            # Keys come and go, the body limit moves; the key in use stays.
            extra = (
                f"auth: {{keys: [{keys}, {{name: extra{round_}, key: sk-extra-{round_}}}]}}\n"
                f"limits: {{max_body_bytes: {round_}MiB}}"
            )
            pool.write(extra, rename=round_ % 2 == 0)
            wait_for(lambda round_=round_: pool.reloads() == 2 + 2 * round_)
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(results) > 50
    failures = [status for status in results if status != 200]
    assert failures == [], errors[:3]
    assert workers_saying(REFUSED, pool.log()) == []
