"""
Circuits shared by worker processes, with real ``twistd`` processes: two
fake Ollamas, one of them with a crashing model, and ``oproxy`` with two
workers over one SQLite state store.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for

FAILING = "llama3.2"
HEALTHY = "qwen3"
OPENED = f"Circuit open: model {FAILING}:latest on backend a"
COOLDOWN = 600  # long enough that no trial request goes during the test


def start_fake(workdir: Path, name: str) -> Daemon:
    port = free_port()
    return start_twistd(
        ["oproxy-fake-ollama", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        port,
        workdir,
        f"{name}-{port}",
    )


def post(url: str, body: dict[str, Any]) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        # A new connection each time, so the kernel hands them to either worker.
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def chat(daemon: Daemon, model: str) -> tuple[int, str]:
    """The status and the backend that answered."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    status, headers, _ = post(f"{daemon.url}/v1/chat/completions", body)
    return status, headers.get("x-oproxy-backend", "-")


def chats_sent(fake: Daemon, model: str) -> int:
    """How many chat requests for ``model`` reached ``fake`` (from its own record)."""
    with urllib.request.urlopen(f"{fake.url}/_fake/requests", timeout=5) as response:
        seen = json.loads(response.read())["requests"]
    names = {model, f"{model}:latest"}
    return sum(1 for r in seen if r["path"] == "/api/chat" and r["model"] in names)


def log_text(daemon: Daemon) -> str:
    try:
        return daemon.log.read_text()
    except FileNotFoundError:
        return ""


def chats_by_worker(log: str) -> Counter[int]:
    """Chat requests each worker's access lines show."""
    found: Counter[int] = Counter()
    for match in re.finditer(r"worker (\d): .*POST /v1/chat/completions", log):
        found[int(match.group(1))] += 1
    return found


@pytest.fixture
def fakes(workdir: Path) -> Iterator[tuple[Daemon, Daemon]]:
    a, b = start_fake(workdir, "fake-a"), start_fake(workdir, "fake-b")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def two_workers(workdir: Path, fakes: tuple[Daemon, Daemon]) -> Iterator[Daemon]:
    a, b = fakes
    port = free_port()
    config = workdir / f"circuits-{port}.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends:
  - {{name: a, url: "{a.url}"}}
  - {{name: b, url: "{b.url}"}}
workers: 2
routing:
  circuit_breaker: {{failures: 3, cooldown: {COOLDOWN}}}
state: {{path: "{workdir / f"circuits-{port}.db"}"}}
"""
    )
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, f"circuits-{port}")
    wait_for(lambda: log_text(daemon).count(" serving (pid ") == 2)
    yield daemon
    daemon.stop()


def test_a_circuit_one_worker_opens_holds_in_both(
    two_workers: Daemon, fakes: tuple[Daemon, Daemon]
) -> None:
    a, b = fakes
    status, _, _ = post(f"{a.url}/_fake/fail", {"model": FAILING})  # its runner crashes
    assert status == 200
    # Every request gets its answer from b; those tried on a first fail there
    # (500, "llama runner process has terminated") and move on.  Whichever
    # worker they went through, the third failure opens the circuit.
    sent = 0
    for _ in range(40):
        assert chat(two_workers, FAILING) == (200, "b")
        sent += 1
        if chats_sent(a, FAILING) == 3:
            break
    assert chats_sent(a, FAILING) == 3
    # Each worker says so as soon as it knows: the one that saw the third
    # failure at once, the other from the shared state a moment later.
    wait_for(
        lambda: all(
            re.search(rf"worker {i}: .*{re.escape(OPENED)}", log_text(two_workers)) for i in (0, 1)
        )
    )
    before = chats_by_worker(log_text(two_workers))
    answers: list[tuple[int, str]] = []

    def both_served_more() -> bool:
        threads = [
            threading.Thread(target=lambda: answers.append(chat(two_workers, FAILING)))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        after = chats_by_worker(log_text(two_workers))
        return all(after[i] > before[i] for i in (0, 1))

    wait_for(both_served_more, seconds=60)
    assert set(answers) == {(200, "b")}
    assert chats_sent(a, FAILING) == 3  # through either worker, nothing more went to a
    assert chats_sent(b, FAILING) == sent + len(answers)
    # The backend's other models are still served there.
    for _ in range(8):
        assert chat(two_workers, HEALTHY)[0] == 200
    assert chats_sent(a, HEALTHY) >= 1
    with urllib.request.urlopen(f"{two_workers.url}/metrics", timeout=10) as response:
        scrape = response.read().decode()
    assert f'oproxy_model_circuit_open{{backend="a",model="{FAILING}:latest"}} 1.0' in scrape
