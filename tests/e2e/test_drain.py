"""
Stopping in the middle of a stream, with a real ``twistd``: the stream
finishes, its usage is settled in the state store, and its parallel slot is
free for the next daemon.

The key is made as a user makes one (``oproxy keys create`` against the
daemon's state file), and the stream comes from the fake Ollama's slow
model, paced by the fake's clock, so the ``SIGTERM`` three seconds in always
lands while tokens are still coming.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import redisserver
from tests.e2e.conftest import Daemon, free_port, start_twistd, wait_for
from tests.e2e.test_keys_limits import oproxy_command
from tests.e2e.test_workers import STOPPED_CLEANLY, log_text

redis_server = redisserver.redis_server

#: Tokens the stream asks for: the slow model sends one every 50 ms, so
#: the stream lasts about six seconds.
MAX_TOKENS = 120

#: Many one-letter words: the fake counts a token per word, the proxy's
#: reservation guesses one per four characters, so the real usage and the
#: reservation differ by about a hundred tokens.
PROMPT = "a " * 200

#: What a stopping daemon must never say about the stream's settlement.
STORE_CLOSED_TOO_EARLY = ("State store settle failed", "was closed")


def write_config(path: Path, port: int, fake: Daemon, workers: int, state: str) -> None:
    path.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
workers: {workers}
backends:
  - {{name: local, type: ollama, url: "{fake.url}"}}
state: {state}
drain_timeout: 30
reload: {{watch: false}}
"""
    )


def start_daemon(workdir: Path, config: Path, port: int, workers: int, name: str) -> Daemon:
    daemon = start_twistd(["oproxy", "--config", str(config)], port, workdir, name)
    if workers > 1:
        wait_for(lambda: log_text(daemon).count(" serving (pid ") == workers)
    return daemon


class Stream:
    """A chat stream read by the official SDK in a thread."""

    def __init__(self, url: str, key: str) -> None:
        self.chunks: list[Any] = []
        self.error: BaseException | None = None
        self.first = threading.Event()
        self._client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        self._thread = threading.Thread(target=self._read)
        self._thread.start()

    def _read(self) -> None:
        try:
            stream = self._client.chat.completions.create(
                model="slow",
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                timeout=60,
            )
            for chunk in stream:
                self.chunks.append(chunk)
                self.first.set()
        except BaseException as e:
            self.error = e
            self.first.set()

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the stream never ended"
        if self.error is not None:
            raise self.error

    @property
    def usage(self) -> Any:
        return next(chunk.usage for chunk in reversed(self.chunks) if chunk.usage is not None)


def daily_tokens(config: Path, name: str) -> int:
    shown = oproxy_command(config, "show", name, "--json")
    assert shown.returncode == 0, shown.stderr
    used: int = json.loads(shown.stdout)["usage"]["daily_tokens"]
    return used


@pytest.mark.parametrize(
    ("workers", "store"),
    [(1, "sqlite"), (2, "sqlite"), (2, "redis")],
)
def test_sigterm_during_a_stream_settles_its_real_usage_and_frees_its_slot(
    workers: int, store: str, workdir: Path, fake_ollama_process: Daemon, request: Any
) -> None:
    """
    With Redis the settlement is answered after the stream has ended, not
    at once as SQLite's is: the store must stay open until it is.
    """
    name = f"drain-{workers}-{store}"
    port = free_port()
    config = workdir / f"{name}.yaml"
    if store == "redis":
        redis = request.getfixturevalue("redis_server")
        state = f"{{backend: redis, url: '{redis.url}/5', namespace: 'drain:'}}"
    else:
        state = f"{{path: '{workdir / name}.db'}}"
    write_config(config, port, fake_ollama_process, workers, state)
    daemon = start_daemon(workdir, config, port, workers, name)
    try:
        made = oproxy_command(
            config, "create", "graceful", "--daily-tokens", "100000", "--max-parallel", "1"
        )
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()

        sent = time.monotonic()
        stream = Stream(daemon.url, key)
        assert stream.first.wait(30), "the stream never started"
        time.sleep(max(0.0, 3.0 - (time.monotonic() - sent)))
        before_stop = len(stream.chunks)
        daemon.process.send_signal(signal.SIGTERM)
        stream.join()
        assert daemon.process.wait(60) in STOPPED_CLEANLY
    finally:
        daemon.stop()

    # The stream was cut by nothing: it went on after the signal, to its end.
    assert len(stream.chunks) > before_stop
    assert stream.chunks[-2].choices[0].finish_reason == "length"
    usage = stream.usage
    assert usage.completion_tokens == MAX_TOKENS
    # What the stream really used is charged, not what was reserved for it.
    assert daily_tokens(config, "graceful") == usage.total_tokens

    # The parallel slot was given back: a new daemon on the same state
    # admits the key at once (a leaked slot would refuse it for a minute).
    again = start_daemon(workdir, config, port, workers, f"{name}-again")
    try:
        client = openai.OpenAI(base_url=f"{again.url}/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content
    finally:
        again.stop()
    log = log_text(daemon)
    for said in STORE_CLOSED_TOO_EARLY:
        assert said not in log, log
