"""
Keys, limits and quotas end to end: real ``twistd`` workers sharing a real
store (SQLite on disk, or a real ``redis-server``), the ``oproxy keys``
command line, and the official OpenAI SDK as the client.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import redisserver
from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for
from tests.e2e.test_workers import chat, log_text

redis_server = redisserver.redis_server

RATE = 10  # requests a minute: one more every 6 s, far slower than a burst takes


def start_daemon(
    workdir: Path, fake: Daemon, name: str, state: str, extra_keys: str = ""
) -> tuple[Daemon, Path]:
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
workers: 2
backends:
  - {{name: local, type: ollama, url: "{fake.url}"}}
auth:
  require_keys: true
  keys:
    - {{name: burst, key: sk-burst, rpm: {RATE}}}
    - {{name: sixty, key: sk-sixty, rpm: 60}}
    - {{name: narrow, key: sk-narrow, models: ["qwen*"]}}
{extra_keys}
state: {state}
"""
    )
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, name)
    wait_for(lambda: log_text(daemon).count(" serving (pid ") == 2)
    return daemon, config


@pytest.fixture(scope="module")
def sqlite_pool(workdir: Path, fake_ollama_process: Daemon) -> Iterator[tuple[Daemon, Path]]:
    state = f"{{path: '{workdir / 'limits-state.db'}'}}"
    daemon, config = start_daemon(workdir, fake_ollama_process, "limits-sqlite", state)
    yield daemon, config
    daemon.stop()


@pytest.fixture(scope="module")
def redis_pool(
    workdir: Path, fake_ollama_process: Daemon, redis_server: Any
) -> Iterator[tuple[Daemon, Path]]:
    state = f"{{backend: redis, url: '{redis_server.url}/3', namespace: 'e2e:'}}"
    daemon, config = start_daemon(workdir, fake_ollama_process, "limits-redis", state)
    yield daemon, config
    daemon.stop()


def burst(url: str, token: str, count: int) -> list[int]:
    """``count`` requests at once, each on its own connection (so both workers take some)."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(
            pool.map(lambda _: chat(url, {"Authorization": f"Bearer {token}"}), range(count))
        )


@pytest.mark.parametrize("pool_name", ["sqlite_pool", "redis_pool"])
def test_a_burst_of_three_times_the_limit_admits_exactly_the_limit(
    pool_name: str, request: pytest.FixtureRequest
) -> None:
    daemon, _ = request.getfixturevalue(pool_name)
    started = time.monotonic()
    codes = burst(daemon.url, "sk-burst", 3 * RATE)
    assert time.monotonic() - started < 60 / RATE, "the burst was too slow to be a burst"
    assert sorted(codes) == [200] * RATE + [429] * (2 * RATE)


def sdk(daemon: Daemon, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=key, **options)


MESSAGES: Any = [{"role": "user", "content": "hi"}]


def test_the_sdk_sees_openais_errors(sqlite_pool: tuple[Daemon, Path]) -> None:
    daemon, _ = sqlite_pool
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        sdk(daemon, "sk-nope").chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert unauthenticated.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk(daemon, "sk-narrow").chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert denied.value.code == "model_not_allowed"
    answer = sdk(daemon, "sk-narrow").chat.completions.create(model="qwen3", messages=MESSAGES)
    assert answer.choices[0].message.content


def test_the_sdk_retries_after_retry_after(redis_pool: tuple[Daemon, Path]) -> None:
    daemon, _ = redis_pool
    client = sdk(daemon, "sk-sixty", max_retries=0)
    headers = None
    for _ in range(60):
        raw = client.chat.completions.with_raw_response.create(model="llama3.2", messages=MESSAGES)
        headers = raw.headers
    assert headers is not None and headers["x-ratelimit-limit-requests"] == "60"
    assert int(headers["x-ratelimit-remaining-requests"]) <= 1  # refill adds at most one a second
    with pytest.raises(openai.RateLimitError) as limited:
        empty_the_bucket(client)
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "1"
    wait_ms = float(limited.value.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000
    # The SDK's own retry waits what Retry-After(-Ms) says (one request refills a second).
    patient = sdk(daemon, "sk-sixty", max_retries=2)
    started = time.monotonic()
    answer = patient.chat.completions.with_raw_response.create(model="llama3.2", messages=MESSAGES)
    waited = time.monotonic() - started
    assert answer.parse().choices[0].message.content
    assert answer.retries_taken >= 1
    assert waited < wait_ms / 1000 + 2


def empty_the_bucket(client: openai.OpenAI) -> None:
    """Call until refused (a second's refill may let one more through)."""
    for _ in range(10):
        client.chat.completions.create(model="llama3.2", messages=MESSAGES)


def oproxy_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("oproxy")
    assert executable is not None, "the oproxy console script is not installed"
    return subprocess.run(
        [executable, "keys", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_keys_from_the_command_line(sqlite_pool: tuple[Daemon, Path], workdir: Path) -> None:
    daemon, config = sqlite_pool
    made = oproxy_command(config, "create", "cli-user", "--rpm", "100", "--models", "llama3*")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("sk-oproxy-") and "only this once" in made.stderr
    key_id = token.split("-")[2]
    # Works at once, in every worker: the daemon reads the same store.
    assert burst(daemon.url, token, 4) == [200] * 4
    with pytest.raises(openai.PermissionDeniedError):
        sdk(daemon, token).chat.completions.create(model="qwen3", messages=MESSAGES)

    listed = oproxy_command(config, "list")
    assert key_id in listed.stdout and "cli-user" in listed.stdout and "rpm=100" in listed.stdout
    assert token.split("-")[3] not in listed.stdout
    shown = oproxy_command(config, "show", "cli-user", "--json")
    assert '"status": "active"' in shown.stdout and '"daily_tokens"' in shown.stdout

    rotated = oproxy_command(config, "rotate", key_id)
    assert rotated.returncode == 0, rotated.stderr
    new_token = rotated.stdout.strip()
    assert new_token != token and new_token.split("-")[2] == key_id
    assert burst(daemon.url, token, 1) == [401]
    assert burst(daemon.url, new_token, 1) == [200]

    revoked = oproxy_command(config, "revoke", "cli-user")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(daemon, new_token).chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert "revoked" in str(refused.value)
    assert oproxy_command(config, "revoke", "nobody").returncode == 1

    # Secrets are in neither the store nor the logs.
    stored = b"".join(p.read_bytes() for p in workdir.glob("limits-state.db*"))
    for secret in (token.split("-")[3], new_token.split("-")[3], "sk-burst", "sk-sixty"):
        assert secret.encode() not in stored
        assert secret not in log_text(daemon)
