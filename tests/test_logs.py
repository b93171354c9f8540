"""
The JSON access log: its lines, its rotation, and what it never contains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest_twisted
from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher

from oproxy.config import AccessLogConfig, APIKey, AuthConfig
from oproxy.logs import AccessLog, Rotator, redacted, rotate
from oproxy.security.keys import hash_key
from tests.conftest import Proxy
from tests.httputil import post_json


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    config = AccessLogConfig(path=str(tmp_path / "access.log"), keep=2)
    writer = AccessLog(config.path)
    for n in range(4):
        writer.write({"n": n})
        rotate(config)
        writer.reopen_if_rotated()
    writer.write({"n": 4})
    assert lines(tmp_path / "access.log") == [{"n": 4}]
    assert lines(tmp_path / "access.log.1") == [{"n": 3}]
    assert lines(tmp_path / "access.log.2") == [{"n": 2}]
    assert not (tmp_path / "access.log.3").exists()


def test_writer_finishes_in_the_rotated_file_until_it_reopens(tmp_path: Path) -> None:
    config = AccessLogConfig(path=str(tmp_path / "access.log"))
    writer = AccessLog(config.path)
    writer.write({"n": 1})
    rotate(config)
    writer.write({"n": 2})  # not yet reopened: lands, whole, in access.log.1
    writer.reopen_if_rotated()
    writer.write({"n": 3})
    assert lines(tmp_path / "access.log.1") == [{"n": 1}, {"n": 2}]
    assert lines(tmp_path / "access.log") == [{"n": 3}]


def test_rotator_by_size_and_by_day(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(86400 * 100 + 3600)
    path = tmp_path / "access.log"
    sized = Rotator(AccessLogConfig(path=str(path), max_bytes=10), clock)
    path.write_bytes(b"12345")
    assert not sized.check()
    path.write_bytes(b"12345678901")
    assert sized.check()
    assert path.read_bytes() == b""
    daily = Rotator(AccessLogConfig(path=str(path), max_bytes=None, daily=True), clock)
    path.write_bytes(b"x")
    assert not daily.check()
    clock.advance(86400)
    assert daily.check()
    assert not daily.check()


@pytest_twisted.ensureDeferred
async def test_one_json_line_per_request_without_secrets(
    proxy_factory: Any, tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy: Proxy = proxy_factory(
        access_log=AccessLogConfig(path=str(path)),
        auth=AuthConfig(keys=(APIKey("alice", hash_key("sk-very-secret")),)),
    )
    headers = {"Authorization": "Bearer sk-very-secret", "X-Request-Id": "trace-1"}
    chat = proxy.v1("chat/completions")
    await post_json(
        proxy.client,
        chat,
        {"model": "llama3.2", "messages": [{"role": "user", "content": "private words"}]},
        headers,
    )
    await post_json(
        proxy.client,
        chat,
        {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        headers,
    )
    await post_json(proxy.client, chat, {"model": "missing", "messages": []}, headers)
    await post_json(proxy.client, chat, {"model": "llama3.2", "messages": []})
    await proxy.settled()
    first, streamed, missing, anonymous = lines(path)
    assert first["request_id"] == "trace-1"
    assert first["key"] == "alice"
    assert first["client"] == "127.0.0.1"
    assert first["method"] == "POST"
    assert first["path"] == "/v1/chat/completions"
    assert first["model"] == "llama3.2"
    assert first["backend"] == "local"
    assert first["status"] == 200
    assert first["latency_seconds"] > 0
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    assert first["cache"] == "BYPASS"
    assert first["error"] is None
    assert streamed["first_token_seconds"] > 0
    assert streamed["completion_tokens"] > 0
    assert missing["status"] == 404 and missing["error"] == "model_not_found"
    assert anonymous["status"] == 401 and anonymous["error"] == "invalid_api_key"
    text = path.read_text()
    assert "sk-very-secret" not in text
    assert "private words" not in text


def test_json_application_log_lines() -> None:
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    from oproxy.logs import json_lines

    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    line = json_lines(
        {
            "log_format": "served {count} requests",
            "count": 3,
            "log_level": LogLevel.error,
            "log_namespace": "oproxy.test",
            "log_time": 1.0,
            "log_failure": failure,
        }
    )
    assert line.endswith("\n") and line.count("\n") == 1
    record = orjson.loads(line)
    assert record["message"] == "served 3 requests"
    assert record["level"] == "error"
    assert record["log_namespace"] == "oproxy.test"
    assert "ValueError: boom" in record["traceback"]


@pytest_twisted.ensureDeferred
async def test_bodies_are_logged_only_when_asked_redacted_and_capped(
    proxy_factory: Any, tmp_path: Path
) -> None:
    quiet_path, loud_path = tmp_path / "quiet.log", tmp_path / "loud.log"
    quiet: Proxy = proxy_factory(access_log=AccessLogConfig(path=str(quiet_path)))
    loud: Proxy = proxy_factory(
        access_log=AccessLogConfig(
            path=str(loud_path), bodies=True, body_max_bytes=300, redact=("api_key", "note")
        )
    )
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "visible prompt"}],
        "options": {"api_key": "hidden-1", "nested": {"note": "hidden-2"}},
        "user": "x" * 1000,
    }
    for proxy in (quiet, loud):
        await post_json(proxy.client, proxy.v1("chat/completions"), body)
        await post_json(
            proxy.client, proxy.v1("chat/completions"), {**body, "stream": True, "user": "s"}
        )
        await proxy.settled()
    (plain, plain_stream) = lines(quiet_path)
    assert "request_body" not in plain and "request_body" not in plain_stream
    assert "visible prompt" not in quiet_path.read_text()
    (logged, logged_stream) = lines(loud_path)
    assert "visible prompt" in logged["request_body"]
    assert logged["request_body"].endswith("[truncated]")
    assert len(logged["request_body"].encode()) <= 300 + len("…[truncated]".encode())
    assert "You said" in logged["response_body"]
    assert (
        "You said" in logged_stream["response_body"]
        or "chat.completion.chunk" in (logged_stream["response_body"])
    )
    text = loud_path.read_text()
    assert "hidden-1" not in text and "hidden-2" not in text
    assert "[redacted]" in text


def test_redaction_reaches_every_depth() -> None:
    keys = frozenset({"secret"})
    value = {"a": [{"secret": 1, "b": {"SECRET": 2}}], "secret": {"deep": 3}}
    assert redacted(value, keys) == {
        "a": [{"secret": "[redacted]", "b": {"SECRET": "[redacted]"}}],
        "secret": "[redacted]",
    }


@pytest_twisted.ensureDeferred
async def test_without_the_json_log_each_request_is_one_line_in_the_daemon_log(
    proxy_factory: Any, tmp_path: Path
) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        plain: Proxy = proxy_factory()
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "private words"}]}
        await post_json(plain.client, plain.v1("chat/completions"), body)
        with_json: Proxy = proxy_factory(access_log=AccessLogConfig(path=str(tmp_path / "a.log")))
        await post_json(with_json.client, with_json.v1("chat/completions"), body)
        await plain.settled()
        await with_json.settled()
    finally:
        globalLogPublisher.removeObserver(events.append)
    access = [formatEvent(e) for e in events if e.get("log_namespace") == "oproxy.access"]
    assert len(access) == 1, access
    assert access[0].startswith('"127.0.0.1" - - [')
    assert '"POST /v1/chat/completions HTTP/1.1" 200 ' in access[0]
    assert "private words" not in access[0]
    assert len(lines(tmp_path / "a.log")) == 1
