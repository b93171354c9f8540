"""
The official ``ollama`` Python client against the real daemon in front of
the fake Ollama, both as processes: what an Ollama user pointing
``OLLAMA_HOST`` at oproxy gets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.e2e.conftest import Daemon, free_port, start_twistd

USER = "sk-e2e-ollama-user"
ADMIN = "sk-e2e-ollama-admin"
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def native_proxy(workdir: Path, fake_ollama_process: Daemon) -> Iterator[Daemon]:
    port = free_port()
    config = workdir / "ollama-client.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends:
  - {{name: local, type: ollama, url: "{fake_ollama_process.url}"}}
models:
  my-alias: {{target: "llama3.2:latest"}}
auth:
  keys:
    - {{name: user, key: "${{OLLAMA_USER_KEY}}"}}
    - {{name: root, key: "${{OLLAMA_ADMIN_KEY}}", admin: true}}
"""
    )
    daemon = start_twistd(
        ["oproxy", "--config", str(config)],
        port,
        workdir,
        "ollama-client",
        {"OLLAMA_USER_KEY": USER, "OLLAMA_ADMIN_KEY": ADMIN},
    )
    yield daemon
    daemon.stop()
    log = daemon.log.read_text()
    assert USER not in log and ADMIN not in log
    assert "Traceback" not in log


def client_for(daemon: Daemon, token: str | None) -> ollama.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return ollama.Client(host=daemon.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def client(native_proxy: Daemon) -> ollama.Client:
    return client_for(native_proxy, USER)


def test_chat(client: ollama.Client) -> None:
    whole = client.chat(model="llama3.2", messages=MESSAGES, options={"num_ctx": 4096})
    assert whole.done and whole.done_reason == "stop"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.model == "llama3.2"
    assert (whole.eval_count or 0) > 0
    parts = list(client.chat(model="llama3.2", messages=MESSAGES, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_an_alias_answers_under_its_own_name(client: ollama.Client) -> None:
    reply = client.chat(model="my-alias", messages=MESSAGES)
    assert reply.model == "my-alias" and reply.message.content
    assert "my-alias" in [m.model for m in client.list().models]


def test_generate(client: ollama.Client) -> None:
    reply = client.generate(model="llama3.2", prompt="Why is the sky blue?")
    assert reply.response and reply.done
    parts = list(client.generate(model="llama3.2", prompt="Why is the sky blue?", stream=True))
    assert "".join(p.response for p in parts) == reply.response


def test_embed(client: ollama.Client) -> None:
    reply = client.embed(model="all-minilm", input=["a cat", "a dog"])
    assert len(reply.embeddings) == 2 and len(reply.embeddings[0]) == 384


def test_list_show_ps(client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert "llama3.2:latest" in names and "all-minilm:latest" in names
    shown = client.show("llama3.2")
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.capabilities and "completion" in shown.capabilities
    client.chat(model="llama3.2", messages=MESSAGES)
    assert "llama3.2:latest" in [m.model for m in client.ps().models]


def test_errors_are_ollamas(native_proxy: Daemon, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client_for(native_proxy, None).list()
    assert refused.value.status_code == 401 and "API key" in refused.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="no-such-model", messages=MESSAGES)
    assert missing.value.status_code == 404
    assert missing.value.error == "model 'no-such-model' not found"


def test_pull_needs_an_admin_key(native_proxy: Daemon, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client.pull("gemma3")
    assert refused.value.status_code == 403
    admin = client_for(native_proxy, ADMIN)
    progress = list(admin.pull("gemma3", stream=True))
    assert progress[0].status == "pulling manifest"
    assert progress[-1].status == "success"
    assert any(p.completed for p in progress)
    assert admin.pull("gemma3").status == "success"
    reply = client.chat(model="gemma3", messages=MESSAGES)
    assert reply.message.content
    with pytest.raises(ollama.ResponseError) as unknown:
        list(admin.pull("nonexistent-model", stream=True))
    assert "file does not exist" in unknown.value.error
