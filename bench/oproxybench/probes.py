"""
Requests and answers: the body each scenario sends to each target, one-off
requests, and the checks that an answer is what the scenario expects before
anything is measured.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any

from .common import (
    CHAT_MODEL,
    EMBED_DIMS,
    EMBED_MODEL,
    EMBED_TEXT,
    LOOPBACK,
    QUESTION,
    SCENARIO_TITLES,
    TARGET_TITLES,
    BenchError,
    Request,
)


def request_for(scenario: str, target: str) -> Request:
    """The path and JSON body wrk sends for one scenario on one target."""
    messages = [{"role": "user", "content": QUESTION}]
    if target == "direct":
        if scenario == "embed":
            return Request("/api/embed", {"model": EMBED_MODEL, "input": EMBED_TEXT})
        return Request(
            "/api/chat",
            {"model": CHAT_MODEL, "messages": messages, "stream": scenario == "stream"},
        )
    if scenario == "embed":
        return Request("/v1/embeddings", {"model": EMBED_MODEL, "input": EMBED_TEXT})
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": messages}
    if scenario == "stream":
        body["stream"] = True
    if target == "cache":
        body["temperature"] = 0
    return Request("/v1/chat/completions", body)


@dataclass
class Probe:
    """One answer, read whole."""

    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


def probe(port: int, request: Request, timeout: float = 15.0) -> Probe:
    """POST one request on a connection of its own, and read the whole answer."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        started = time.perf_counter()
        conn.request(
            "POST",
            request.path,
            json.dumps(request.body).encode(),
            {"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        data = response.read()
        return Probe(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            data,
            time.perf_counter() - started,
        )
    finally:
        conn.close()


def sse_events(body: bytes) -> list[bytes]:
    """The data of each server-sent event in a whole answer."""
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def check_answer(scenario: str, target: str, answer: Probe) -> int | None:
    """
    Check one answer is what the scenario expects, and return the number of
    chunks of a streamed answer (None for a whole one).  Raises BenchError
    when it is wrong.
    """
    what = f"{SCENARIO_TITLES[scenario]} on {TARGET_TITLES[target]}"
    if answer.status != 200:
        raise BenchError(f"{what}: HTTP {answer.status}: {answer.body[:300]!r}")
    try:
        if target == "direct":
            if scenario == "stream":
                lines = [json.loads(x) for x in answer.body.splitlines() if x.strip()]
                assert lines[-1]["done"] is True
                return len(lines)
            obj = json.loads(answer.body)
            if scenario == "embed":
                assert len(obj["embeddings"][0]) == EMBED_DIMS
            else:
                assert obj["message"]["content"]
            return None
        if scenario == "stream":
            events = sse_events(answer.body)
            assert events and events[-1] == b"[DONE]", "no [DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks)
            return len(chunks)
        obj = json.loads(answer.body)
        if scenario == "embed":
            assert len(obj["data"][0]["embedding"]) == EMBED_DIMS
        else:
            assert obj["choices"][0]["message"]["content"]
        return None
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BenchError(f"{what}: unexpected answer ({e}): {answer.body[:300]!r}") from None


def wait_until_serving(port: int, scenario: str, target: str, timeout: float = 30.0) -> None:
    """Workers may still be starting after the port opens: retry one request."""
    request = request_for(scenario, target)
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = probe(port, request, timeout=5)
            if answer.status == 200:
                return
            last = f"HTTP {answer.status}: {answer.body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise BenchError(f"{TARGET_TITLES[target]} never answered 200 ({last})")
