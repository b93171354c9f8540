"""
Ollama's native API through the proxy: what an Ollama client (Open WebUI,
the ``ollama`` libraries) sees, under oproxy's keys, limits and routing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import Site

from oproxy.config import APIKey, AuthConfig, BackendConfig, ModelRule, RoutingConfig, StateConfig
from oproxy.security.keys import hash_key
from oproxy.security.limits import estimate_completion_tokens, estimate_prompt_tokens
from oproxy.security.policy import KeyPolicy, Limits
from oproxy.testing import DEFAULT_MODELS, FakeModel, FakeOllama
from tests.conftest import Proxy, listen
from tests.httputil import header, raw_post

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
GENERATE = {"model": "llama3.2", "prompt": "Why is the sky blue?"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def key(name: str, secret: str, **policy: Any) -> APIKey:
    return APIKey(name=name, sha256=hash_key(secret), policy=KeyPolicy(**policy))


async def call(
    proxy: Proxy,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[Any, bytes]:
    response = await proxy.client.request(
        method,
        f"{proxy.url}{path}",
        data=body if isinstance(body, bytes) or body is None else orjson.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    return response, await treq.content(response)


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    """Ollama's framing exactly: one JSON object a line, each ending in a newline."""
    assert raw.endswith(b"\n"), raw[-80:]
    return [orjson.loads(line) for line in raw[:-1].split(b"\n")]


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait for ``condition``, failing (not hanging) if it does not come true."""
    deadline = reactor.seconds() + seconds
    while not condition():
        assert reactor.seconds() < deadline, "timed out waiting"
        await task.deferLater(reactor, 0.01)


def tokens(proxy: Proxy, direction: str, model: str, key_name: str = "-") -> float:
    registry = proxy.app.metrics.registry
    assert registry is not None
    labels = {"direction": direction, "model": model, "key": key_name}
    return registry.get_sample_value("oproxy_tokens_total", labels) or 0.0


@pytest.fixture
def second_ollama() -> Iterator[tuple[FakeOllama, str]]:
    """Another Ollama: its own llama3.2 (a different size) and a model of its own."""
    models = (
        replace(DEFAULT_MODELS[0], size=1234),
        FakeModel(name="phi4:latest", modified_at="2025-07-01T00:00:00-07:00"),
    )
    fake = FakeOllama(reactor, models=models, version="0.13.0")
    running = listen(Site(fake.resource()))
    yield fake, running.url
    pytest_twisted.blockon(running.port.stopListening())


def two_backends(first_url: str, second_url: str) -> tuple[BackendConfig, BackendConfig]:
    return (
        BackendConfig(name="first", type="ollama", url=first_url),
        BackendConfig(name="second", type="ollama", url=second_url),
    )


# -- inference -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chat_streams_by_default(proxy: Proxy) -> None:
    response, raw = await call(proxy, "POST", "/api/chat", CHAT)
    assert response.code == 200
    assert header(response, "content-type") == "application/x-ndjson"
    assert header(response, "x-oproxy-backend") == "local"
    lines = ndjson(raw)
    assert len(lines) > 2
    assert all(line["model"] == "llama3.2" for line in lines)
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    last = lines[-1]
    assert last["done_reason"] == "stop" and last["eval_count"] > 0
    text = "".join(line["message"]["content"] for line in lines)
    # The same words as the answer in one piece.
    response, raw = await call(proxy, "POST", "/api/chat", {**CHAT, "stream": False})
    whole = orjson.loads(raw)
    assert header(response, "content-type") == "application/json; charset=utf-8"
    assert whole["message"]["content"] == text
    assert whole["done"] is True and whole["model"] == "llama3.2"
    assert tokens(proxy, "completion", "llama3.2") == last["eval_count"] + whole["eval_count"]
    assert tokens(proxy, "prompt", "llama3.2") == last["prompt_eval_count"] * 2


@pytest_twisted.ensureDeferred
async def test_generate_streaming_and_not(proxy: Proxy) -> None:
    response, raw = await call(proxy, "POST", "/api/generate", GENERATE)
    lines = ndjson(raw)
    assert response.code == 200 and lines[-1]["done"] is True
    assert "context" in lines[-1]
    response, raw = await call(proxy, "POST", "/api/generate", {**GENERATE, "stream": False})
    answer = orjson.loads(raw)
    assert answer["response"] == "".join(line["response"] for line in lines)
    assert answer["eval_count"] == lines[-1]["eval_count"]


@pytest_twisted.ensureDeferred
async def test_embed_and_legacy_embeddings(proxy: Proxy) -> None:
    body = {"model": "all-minilm", "input": ["a cat", "a dog"]}
    response, raw = await call(proxy, "POST", "/api/embed", body)
    answer = orjson.loads(raw)
    assert response.code == 200
    assert answer["model"] == "all-minilm"
    assert [len(v) for v in answer["embeddings"]] == [384, 384]
    assert tokens(proxy, "prompt", "all-minilm") == answer["prompt_eval_count"]
    response, raw = await call(
        proxy, "POST", "/api/embeddings", {"model": "all-minilm", "prompt": "a cat"}
    )
    assert response.code == 200
    assert len(orjson.loads(raw)["embedding"]) == 384


@pytest_twisted.ensureDeferred
async def test_show_and_its_legacy_name(proxy: Proxy) -> None:
    response, raw = await call(proxy, "POST", "/api/show", {"model": "llama3.2"})
    shown = orjson.loads(raw)
    assert response.code == 200
    assert shown["details"]["family"] == "llama"
    assert "model_info" in shown and "capabilities" in shown
    response, raw = await call(proxy, "POST", "/api/show", {"name": "llama3.2"})
    assert response.code == 200 and orjson.loads(raw) == shown
    response, raw = await call(proxy, "POST", "/api/show", {"model": "nope"})
    assert (response.code, orjson.loads(raw)) == (404, {"error": "model 'nope' not found"})
    response, raw = await call(proxy, "POST", "/api/show", {})
    assert (response.code, orjson.loads(raw)) == (400, {"error": "model is required"})


@pytest_twisted.ensureDeferred
async def test_ollama_errors_keep_their_status_and_message(proxy: Proxy) -> None:
    response, raw = await call(proxy, "POST", "/api/chat", {**CHAT, "think": True})
    assert response.code == 400
    assert orjson.loads(raw) == {"error": '"llama3.2" does not support thinking'}
    proxy.fake.fail_next(500, "llama runner process has terminated")
    response, raw = await call(proxy, "POST", "/api/generate", GENERATE)
    assert response.code == 500
    assert orjson.loads(raw) == {"error": "llama runner process has terminated"}
    response, raw = await call(proxy, "POST", "/api/chat", b"{")
    assert response.code == 400 and set(orjson.loads(raw)) == {"error"}


@pytest_twisted.ensureDeferred
async def test_a_failure_mid_stream_is_the_last_line(proxy: Proxy) -> None:
    response, raw = await call(proxy, "POST", "/api/chat", {**CHAT, "model": "broken"})
    lines = ndjson(raw)
    assert response.code == 200
    assert "error" in lines[-1] and not any(line.get("done") for line in lines)


# -- listings ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tags_union_of_backends_and_aliases(
    proxy_factory: Any, fake_ollama: tuple[FakeOllama, str], second_ollama: tuple[FakeOllama, str]
) -> None:
    proxy = proxy_factory(
        backends=two_backends(fake_ollama[1], second_ollama[1]),
        routing=RoutingConfig(models=(ModelRule(pattern="my-alias", target="llama3.2:latest"),)),
    )
    response, raw = await call(proxy, "GET", "/api/tags")
    models = orjson.loads(raw)["models"]
    names = [m["name"] for m in models]
    assert response.code == 200
    assert len(names) == len(set(names))
    assert set(names) == {m.name for m in DEFAULT_MODELS} | {"phi4:latest", "my-alias"}
    by_name = {m["name"]: m for m in models}
    assert by_name["llama3.2:latest"]["size"] == DEFAULT_MODELS[0].size  # the first wins
    assert by_name["my-alias"] == {
        **by_name["llama3.2:latest"],
        "name": "my-alias",
        "model": "my-alias",
    }
    response, raw = await call(proxy, "GET", "/api/version")
    assert orjson.loads(raw) == {"version": "0.12.6"}


@pytest_twisted.ensureDeferred
async def test_tags_show_only_what_the_key_may_use(proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(keys=(key("narrow", "sk-narrow", models=("llama3*",)),)),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    response, raw = await call(proxy, "GET", "/api/tags", headers=bearer("sk-narrow"))
    names = [m["name"] for m in orjson.loads(raw)["models"]]
    assert names == ["llama3.2:latest"]
    response, raw = await call(
        proxy, "POST", "/api/chat", {**CHAT, "model": "qwen3"}, bearer("sk-narrow")
    )
    assert response.code == 403 and set(orjson.loads(raw)) == {"error"}


@pytest_twisted.ensureDeferred
async def test_ps_version_and_root(proxy: Proxy) -> None:
    response, raw = await call(proxy, "GET", "/api/ps")
    assert (response.code, orjson.loads(raw)) == (200, {"models": []})
    await call(proxy, "POST", "/api/chat", {**CHAT, "stream": False})
    response, raw = await call(proxy, "GET", "/api/ps")
    assert [m["name"] for m in orjson.loads(raw)["models"]] == ["llama3.2:latest"]
    response, raw = await call(proxy, "GET", "/api/version")
    assert orjson.loads(raw) == {"version": "0.12.6"}
    response = await proxy.client.get(f"{proxy.url}/")
    assert await treq.content(response) == b"Ollama is running"
    assert header(response, "content-type") == "text/plain; charset=utf-8"
    response = await proxy.client.head(f"{proxy.url}/")
    assert response.code == 200 and await treq.content(response) == b""
    response = await proxy.client.get(f"{proxy.url}/", headers={"Accept": "application/json"})
    assert orjson.loads(await treq.content(response))["name"] == "oproxy"


# -- routing ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_alias_goes_upstream_as_its_target_and_comes_back(proxy_factory: Any) -> None:
    rule = ModelRule(
        pattern="my-alias",
        target="llama3.2:latest",
        options=(("temperature", 0.1), ("num_ctx", 4096), ("keep_alive", "10m")),
    )
    proxy = proxy_factory(routing=RoutingConfig(models=(rule,)))
    body = {**CHAT, "model": "my-alias", "options": {"temperature": 0.7}}
    response, raw = await call(proxy, "POST", "/api/chat", body)
    assert response.code == 200
    assert {line["model"] for line in ndjson(raw)} == {"my-alias"}
    path, sent = proxy.fake.stats.requests[-1]
    assert path == "/api/chat" and sent["model"] == "llama3.2:latest"
    assert sent["options"] == {"temperature": 0.7, "num_ctx": 4096}  # the client's wins
    assert sent["keep_alive"] == "10m"
    response, raw = await call(proxy, "POST", "/api/generate", {**GENERATE, "model": "my-alias"})
    assert {line["model"] for line in ndjson(raw)} == {"my-alias"}
    response, raw = await call(
        proxy, "POST", "/api/generate", {**GENERATE, "model": "my-alias", "stream": False}
    )
    assert orjson.loads(raw)["model"] == "my-alias"


@pytest_twisted.ensureDeferred
async def test_a_backend_that_is_down_is_passed_over(
    proxy_factory: Any, fake_ollama: tuple[FakeOllama, str]
) -> None:
    dead = listen(Site(Resource()))
    await dead.port.stopListening()
    proxy = proxy_factory(
        backends=(
            BackendConfig(name="dead", type="ollama", url=dead.url),
            BackendConfig(name="local", type="ollama", url=fake_ollama[1]),
        ),
        routing=RoutingConfig(strategy="round-robin", breaker_failures=100),
    )
    for body in (CHAT, {**CHAT, "stream": False}, CHAT, {**CHAT, "stream": False}):
        response, raw = await call(proxy, "POST", "/api/chat", body)
        assert response.code == 200, raw
        assert header(response, "x-oproxy-backend") == "local"
    # Turns that went to the dead backend first moved on to the live one.
    assert proxy.app.router.state.breaker._circuits["dead", ""].failures >= 1


# -- keys and limits ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keys_and_limits_answer_like_ollama(proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(keys=(key("alice", "sk-alice", limits=Limits(rpm=2)),)),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    response, raw = await call(proxy, "POST", "/api/chat", CHAT)
    assert response.code == 401
    assert set(orjson.loads(raw)) == {"error"} and "API key" in orjson.loads(raw)["error"]
    response, raw = await call(proxy, "GET", "/api/tags", headers=bearer("sk-wrong"))
    assert response.code == 401 and set(orjson.loads(raw)) == {"error"}
    response, _ = await call(proxy, "POST", "/api/chat", CHAT, bearer("sk-alice"))
    assert response.code == 200
    assert header(response, "x-ratelimit-remaining-requests") == "1"
    assert tokens(proxy, "completion", "llama3.2", "alice") > 0
    response, _ = await call(proxy, "POST", "/api/generate", GENERATE, bearer("sk-alice"))
    assert response.code == 200
    embed = {"model": "all-minilm", "input": "a cat"}
    response, raw = await call(proxy, "POST", "/api/embed", embed, bearer("sk-alice"))
    assert response.code == 429
    assert "Rate limit reached" in orjson.loads(raw)["error"]
    assert set(orjson.loads(raw)) == {"error"}
    assert int(header(response, "retry-after") or 0) >= 1


@pytest_twisted.ensureDeferred
async def test_client_that_leaves_stops_the_generation(proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(keys=(key("alice", "sk-alice", limits=Limits(daily_tokens=10**6)),)),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    client = await raw_post(
        proxy.url,
        "/api/chat",
        {**CHAT, "model": "slow", "options": {"num_predict": 500}},
        bearer("sk-alice"),
    )
    await eventually(lambda: client.received.count(b'"done":false') >= 5)
    client.transport.loseConnection()
    await eventually(lambda: proxy.fake.stats.aborted == 1)
    await task.deferLater(reactor, 0.05)
    assert proxy.fake.pending_timers() == 0
    generated = tokens(proxy, "completion", "slow", "alice")
    assert 5 <= generated < 500


# -- model management ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pull_copy_delete_for_admin_keys_only(proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(keys=(key("root", "sk-root", admin=True), key("user", "sk-user"))),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    response, raw = await call(proxy, "POST", "/api/pull", {"model": "gemma3"}, bearer("sk-user"))
    assert response.code == 403 and set(orjson.loads(raw)) == {"error"}
    assert "gemma3:latest" not in proxy.fake.models

    response, raw = await call(proxy, "POST", "/api/pull", {"model": "gemma3"}, bearer("sk-root"))
    lines = ndjson(raw)
    assert response.code == 200
    assert header(response, "content-type") == "application/x-ndjson"
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    assert any("completed" in line for line in lines)
    # The router knows at once: the model can be used.
    assert proxy.app.router.state.catalog.serves("local", "gemma3") is True
    response, _ = await call(
        proxy, "POST", "/api/chat", {**CHAT, "model": "gemma3"}, bearer("sk-user")
    )
    assert response.code == 200

    response, raw = await call(
        proxy, "POST", "/api/pull", {"name": "nonexistent", "stream": False}, bearer("sk-root")
    )
    assert response.code == 500
    assert orjson.loads(raw) == {"error": "pull model manifest: file does not exist"}

    copy = {"source": "gemma3", "destination": "gemma3-backup"}
    response, raw = await call(proxy, "POST", "/api/copy", copy, bearer("sk-root"))
    assert (response.code, raw) == (200, b"")
    assert proxy.app.router.state.catalog.serves("local", "gemma3-backup") is True
    response, raw = await call(
        proxy, "DELETE", "/api/delete", {"model": "gemma3-backup"}, bearer("sk-root")
    )
    assert (response.code, raw) == (200, b"")
    assert "gemma3-backup:latest" not in proxy.fake.models
    assert proxy.app.router.state.catalog.serves("local", "gemma3-backup") is False
    response, raw = await call(
        proxy, "DELETE", "/api/delete", {"model": "gemma3-backup"}, bearer("sk-root")
    )
    assert (response.code, orjson.loads(raw)) == (
        404,
        {"error": "model 'gemma3-backup' not found"},
    )


@pytest_twisted.ensureDeferred
async def test_create_and_push_for_admin_keys_only(proxy_factory: Any, tmp_path: Path) -> None:
    proxy = proxy_factory(
        auth=AuthConfig(keys=(key("root", "sk-root", admin=True), key("user", "sk-user"))),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    mario = {"model": "mario", "from": "llama3.2", "system": "You are Mario."}
    refused = {"error": "This operation needs an admin API key."}
    for path, body in (("/api/create", mario), ("/api/push", {"model": "llama3.2"})):
        response, raw = await call(proxy, "POST", path, body, bearer("sk-user"))
        assert (response.code, orjson.loads(raw)) == (403, refused), path
    assert "mario" not in proxy.fake.models
    assert [path for path, _ in proxy.fake.stats.requests] == []  # nothing went upstream

    response, raw = await call(proxy, "POST", "/api/create", mario, bearer("sk-root"))
    lines = ndjson(raw)
    assert response.code == 200
    assert header(response, "content-type") == "application/x-ndjson"
    assert lines[-2:] == [{"status": "writing manifest"}, {"status": "success"}]
    assert any(line["status"].startswith("creating new layer sha256:") for line in lines)
    assert proxy.fake.stats.requests[-1] == ("/api/create", mario)
    # The proxy's own listing has it at once, and it answers.
    response, raw = await call(proxy, "GET", "/api/tags", headers=bearer("sk-user"))
    assert "mario:latest" in [m["name"] for m in orjson.loads(raw)["models"]]
    response, raw = await call(
        proxy, "POST", "/api/chat", {**CHAT, "model": "mario", "stream": False}, bearer("sk-user")
    )
    assert response.code == 200
    assert orjson.loads(raw)["message"]["content"].endswith("fake answer from mario.")

    response, raw = await call(
        proxy,
        "POST",
        "/api/create",
        {**mario, "model": "peach", "stream": False},
        bearer("sk-root"),
    )
    assert (response.code, orjson.loads(raw)) == (200, {"status": "success"})
    response, raw = await call(
        proxy, "POST", "/api/create", {"model": "x", "from": "nonexistent"}, bearer("sk-root")
    )
    assert response.code == 200
    assert ndjson(raw) == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    response, raw = await call(proxy, "POST", "/api/create", {"model": "x"}, bearer("sk-root"))
    assert (response.code, orjson.loads(raw)) == (
        400,
        {"error": "neither 'from' or 'files' was specified"},
    )

    response, raw = await call(proxy, "POST", "/api/push", {"model": "mario"}, bearer("sk-root"))
    lines = ndjson(raw)
    assert response.code == 200
    assert header(response, "content-type") == "application/x-ndjson"
    assert lines[0] == {"status": "retrieving manifest"}
    assert lines[-2:] == [{"status": "pushing manifest"}, {"status": "success"}]
    blobs = [line for line in lines if "digest" in line]
    assert blobs and all(line["status"] == "pushing " + line["digest"][7:19] for line in blobs)
    assert blobs[-1]["completed"] == blobs[-1]["total"]
    response, raw = await call(
        proxy, "POST", "/api/push", {"name": "mario", "stream": False}, bearer("sk-root")
    )
    assert (response.code, orjson.loads(raw)) == (200, {"status": "success"})
    response, raw = await call(
        proxy, "POST", "/api/push", {"model": "nope", "stream": False}, bearer("sk-root")
    )
    missing = (
        "open /root/.ollama/models/manifests/registry.ollama.ai/library/nope/latest: "
        "no such file or directory"
    )
    assert (response.code, orjson.loads(raw)) == (500, {"error": missing})


@pytest_twisted.ensureDeferred
async def test_management_is_refused_without_keys(proxy: Proxy) -> None:
    for path, body in (
        ("/api/pull", {"model": "gemma3"}),
        ("/api/create", {"model": "mario", "from": "llama3.2"}),
        ("/api/push", {"model": "llama3.2"}),
    ):
        response, raw = await call(proxy, "POST", path, body)
        assert response.code == 403, path
        assert orjson.loads(raw) == {"error": "This operation needs an admin API key."}


@pytest_twisted.ensureDeferred
async def test_pull_on_each_backend_or_the_one_named(
    proxy_factory: Any,
    fake_ollama: tuple[FakeOllama, str],
    second_ollama: tuple[FakeOllama, str],
    tmp_path: Path,
) -> None:
    proxy = proxy_factory(
        backends=two_backends(fake_ollama[1], second_ollama[1]),
        auth=AuthConfig(keys=(key("root", "sk-root", admin=True),)),
        state=StateConfig(path=str(tmp_path / "state.db")),
    )
    second = second_ollama[0]
    response, raw = await call(proxy, "POST", "/api/pull", {"model": "gemma3"}, bearer("sk-root"))
    lines = ndjson(raw)
    assert response.code == 200
    assert lines.count({"status": "success"}) == 2 and lines[-1] == {"status": "success"}
    assert "gemma3" in proxy.fake.models and "gemma3" in second.models

    named = {**bearer("sk-root"), "x-oproxy-backend": "second"}
    response, raw = await call(proxy, "POST", "/api/pull", {"model": "mistral"}, named)
    assert response.code == 200 and ndjson(raw)[-1] == {"status": "success"}
    assert "mistral" in second.models and "mistral" not in proxy.fake.models

    # A copy where only one backend has the source still succeeds.
    copy = {"source": "mistral", "destination": "mistral-copy"}
    response, raw = await call(proxy, "POST", "/api/copy", copy, bearer("sk-root"))
    assert (response.code, raw) == (200, b"")
    assert "mistral-copy" in second.models

    unknown = {**bearer("sk-root"), "x-oproxy-backend": "nowhere"}
    response, raw = await call(proxy, "POST", "/api/pull", {"model": "gemma3"}, unknown)
    assert response.code == 400 and "nowhere" in orjson.loads(raw)["error"]


# -- the estimates the limits charge -------------------------------------------------------


def test_native_bodies_are_estimated() -> None:
    assert estimate_completion_tokens("chat", {"options": {"num_predict": 40}}) == 40
    assert estimate_completion_tokens("chat", {"options": {"num_predict": -1}}) == 256
    assert (
        estimate_completion_tokens("chat", {"max_tokens": 7, "options": {"num_predict": 40}}) == 7
    )
    text = {"role": "user", "content": "x" * 40}
    with_image = {**text, "images": ["A" * 100_000]}  # an image is not 25,000 tokens of text
    assert estimate_prompt_tokens("chat", {"messages": [with_image]}) == (
        estimate_prompt_tokens("chat", {"messages": [text]}) + 768
    )
    assert estimate_prompt_tokens("completions", {"prompt": "x" * 8, "images": ["A" * 8]}) == 770
    assert estimate_prompt_tokens("embeddings", {"prompt": "x" * 40}) == 10
