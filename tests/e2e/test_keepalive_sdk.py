"""
The official ``openai`` SDK with a read timeout shorter than a model's load:
the proxy's ``: loading`` comments keep the stream alive until the answer
comes, where without them the SDK gives up.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from oproxy.testing.ollama import COLD_LOAD_SECONDS
from tests.e2e.conftest import Daemon, fake_stats, free_port, reset_fake, start_twistd

#: Shorter than the cold model's load, longer than the keep-alive interval.
READ_TIMEOUT = COLD_LOAD_SECONDS / 2
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a story"}
]


def start_proxy(workdir: Path, fake: Daemon, name: str, after: float, interval: float) -> Daemon:
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends:
  - {{name: local, type: ollama, url: "{fake.url}"}}
streaming: {{keepalive_after: {after}, keepalive_interval: {interval}}}
"""
    )
    return start_twistd(["oproxy", "--config", str(config)], port, workdir, name)


@pytest.fixture(scope="module")
def keepalive_proxy(workdir: Path, fake_ollama_process: Daemon) -> Iterator[Daemon]:
    interval = READ_TIMEOUT / 3
    daemon = start_proxy(workdir, fake_ollama_process, "oproxy-keepalive", interval, interval)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def silent_proxy(workdir: Path, fake_ollama_process: Daemon) -> Iterator[Daemon]:
    daemon = start_proxy(workdir, fake_ollama_process, "oproxy-silent", 60, 60)
    yield daemon
    daemon.stop()


def sdk(proxy: Daemon) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=openai.Timeout(10.0, read=READ_TIMEOUT),
    )


def test_keepalives_outlast_the_read_timeout(
    keepalive_proxy: Daemon, fake_ollama_process: Daemon
) -> None:
    reset_fake(fake_ollama_process)  # unloads every model: "cold" is cold
    with sdk(keepalive_proxy) as client:
        stream = client.chat.completions.create(model="cold", messages=MESSAGES, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        whole = client.chat.completions.create(model="cold", messages=MESSAGES)
    assert text and text == whole.choices[0].message.content
    assert fake_stats(fake_ollama_process)["completed"] == 2


def test_without_keepalives_the_read_timeout_fires(
    silent_proxy: Daemon, fake_ollama_process: Daemon
) -> None:
    reset_fake(fake_ollama_process)
    # Nothing at all comes during the load, not even the headers.
    with sdk(silent_proxy) as client, pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="cold", messages=MESSAGES, stream=True)
