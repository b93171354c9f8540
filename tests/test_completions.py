"""
``POST /v1/completions`` through the proxy, against the fake Ollama.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest_twisted
from twisted.internet import reactor, task

from tests.conftest import Proxy
from tests.httputil import post_json, sse_events
from tests.openai_schema import assert_valid, assert_valid_sse


async def complete(proxy: Proxy, **body: Any) -> tuple[Any, Any]:
    body.setdefault("model", "llama3.2")
    body.setdefault("prompt", "Once upon a time")
    response, raw = await post_json(proxy.client, proxy.v1("completions"), body)
    return response, raw if body.get("stream") else orjson.loads(raw)


def generate_bodies(proxy: Proxy) -> list[dict[str, Any]]:
    return [b for p, b in proxy.fake.stats.requests if p == "/api/generate"]


@pytest_twisted.ensureDeferred
async def test_single_prompt(proxy: Proxy) -> None:
    response, body = await complete(proxy, max_tokens=20, temperature=0)
    assert response.code == 200
    assert_valid("CreateCompletionResponse", body)
    (choice,) = body["choices"]
    assert choice["text"] and choice["index"] == 0
    assert choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] > 0
    (sent,) = generate_bodies(proxy)
    assert sent["prompt"] == "Once upon a time"
    assert sent["options"]["num_predict"] == 20
    assert sent["options"]["temperature"] == 0


@pytest_twisted.ensureDeferred
async def test_list_of_prompts_gives_one_choice_each(proxy: Proxy) -> None:
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    _, body = await complete(proxy, prompt=prompts)
    assert_valid("CreateCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(b["prompt"] for b in generate_bodies(proxy)) == sorted(prompts)
    singles = []
    for prompt in prompts:
        _, one = await complete(proxy, prompt=prompt)
        singles.append(one["choices"][0]["text"])
    assert [c["text"] for c in body["choices"]] == singles
    assert body["usage"]["prompt_tokens"] == 6


@pytest_twisted.ensureDeferred
async def test_streaming(proxy: Proxy) -> None:
    _, whole = await complete(proxy)
    _, raw = await complete(proxy, stream=True, stream_options={"include_usage": True})
    assert_valid_sse("CreateCompletionStreamResponse", raw.decode())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


@pytest_twisted.ensureDeferred
async def test_streaming_several_prompts(proxy: Proxy) -> None:
    _, raw = await complete(proxy, stream=True, prompt=["one", "two words"])
    chunks = sse_events(raw)[:-1]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


@pytest_twisted.ensureDeferred
async def test_suffix_and_echo(proxy: Proxy) -> None:
    _, body = await complete(
        proxy, model="qwen2.5-coder", prompt="def f(", suffix="return x", echo=True
    )
    (sent,) = generate_bodies(proxy)
    assert sent["suffix"] == "return x"
    assert body["choices"][0]["text"].startswith("def f(")


@pytest_twisted.ensureDeferred
async def test_token_prompts_are_refused_clearly(proxy: Proxy) -> None:
    response, raw = await post_json(
        proxy.client, proxy.v1("completions"), {"model": "llama3.2", "prompt": [1, 2, 3]}
    )
    assert response.code == 400
    assert orjson.loads(raw)["error"]["param"] == "prompt"


@pytest_twisted.ensureDeferred
async def test_one_failed_prompt_closes_the_others(proxy: Proxy) -> None:
    proxy.fake.fail_next(500, "boom")
    response, raw = await complete(proxy, model="slow", prompt=["a", "b"], stream=True)
    assert response.code == 502, raw
    # The other prompt's generation, if it had begun (the failure may come
    # first), is stopped: none runs on, none completes.
    for _ in range(250):
        if proxy.fake.stats.in_flight == 0 and proxy.fake.stats.aborted == proxy.fake.stats.started:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert proxy.fake.stats.in_flight == 0
    assert proxy.fake.stats.aborted == proxy.fake.stats.started
    assert proxy.fake.stats.completed == 0
