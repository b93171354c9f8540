"""
The real daemon and the real fake Ollama, driven by the official ``openai``
SDK and ``curl``, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.conftest import Daemon, fake_stats, reset_fake

KEY = "sk-e2e-secret"


@pytest.fixture(scope="module")
def client(oproxy_process: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{oproxy_process.url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
        extra_body={"options": {"num_ctx": 4096}},
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens > 0
    assert reply._request_id


def test_chat_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "Tell me a story"}]
    )
    stream = client.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens > 0


def test_tools(client: openai.OpenAI) -> None:
    tools: list[openai.types.chat.ChatCompletionToolParam] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Weather in Tokyo?"}
    ]
    reply = client.chat.completions.create(model="llama3.2", messages=messages, tools=tools)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    json.loads(call.function.arguments)
    messages.append(choice.message.model_dump(exclude_none=True))  # type: ignore[arg-type]
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "rain, 12C"})
    final = client.chat.completions.create(model="llama3.2", messages=messages, tools=tools)
    assert "rain, 12C" in (final.choices[0].message.content or "")


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="llama3.2", prompt=["one", "two"], max_tokens=5)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text for c in reply.choices)


def test_chat_n(client: openai.OpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Name a colour"}
    ]
    reply = client.chat.completions.create(model="llama3.2", messages=messages, n=2, seed=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "stop" for c in reply.choices)
    single = client.chat.completions.create(model="llama3.2", messages=messages, seed=3)
    assert reply.usage is not None and single.usage is not None
    assert reply.usage.total_tokens == 2 * single.usage.total_tokens

    stream = client.chat.completions.create(
        model="llama3.2",
        messages=messages,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    finished: dict[int, str] = {}
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        if chunk.usage:
            usage = chunk.usage
    assert texts == [c.message.content for c in reply.choices]
    assert finished == {0: "stop", 1: "stop"}
    assert usage is not None and usage.total_tokens == reply.usage.total_tokens


def test_completions_n(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="llama3.2", prompt=["one", "two"], n=2, max_tokens=5)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text != reply.choices[2].text
    stream = client.completions.create(
        model="llama3.2", prompt=["one", "two"], n=2, max_tokens=5, stream=True
    )
    texts = ["", "", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in reply.choices]


def test_too_many_choices_or_prompts(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as many_choices:
        client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], n=9
        )
    assert many_choices.value.param == "n"
    with pytest.raises(openai.BadRequestError) as many_prompts:
        client.completions.create(model="llama3.2", prompt=["x"] * 65)
    assert many_prompts.value.param == "prompt"


def test_embeddings_default_encoding_matches_float(client: openai.OpenAI) -> None:
    default = client.embeddings.create(model="all-minilm", input=["hello", "world"])
    floats = client.embeddings.create(
        model="all-minilm", input=["hello", "world"], encoding_format="float"
    )
    assert len(default.data) == 2
    for a, b in zip(default.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6, abs=1e-7)


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "llama3.2:latest" in ids
    assert client.models.retrieve("llama3.2:latest").id == "llama3.2:latest"


def test_errors(client: openai.OpenAI, oproxy_process: Daemon) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(
            model="missing-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "hi"}],
            temperature="hot",  # type: ignore[arg-type]
        )
    assert bad.value.param == "temperature"
    with (
        openai.OpenAI(
            base_url=f"{oproxy_process.url}/v1", api_key="sk-wrong", max_retries=0
        ) as stranger,
        pytest.raises(openai.AuthenticationError),
    ):
        stranger.models.list()


def test_mid_stream_error_raises_api_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="broken", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError) as raised:
        for _ in stream:
            pass
    assert raised.value.message


def test_disconnect_cancels_upstream(client: openai.OpenAI, fake_ollama_process: Daemon) -> None:
    reset_fake(fake_ollama_process)
    stream = client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "go"}], stream=True
    )
    for count, _ in enumerate(stream):
        if count == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while fake_stats(fake_ollama_process)["aborted"] < 1:
        assert time.monotonic() < deadline, fake_stats(fake_ollama_process)
        time.sleep(0.05)
    assert fake_stats(fake_ollama_process)["completed"] == 0


def test_curl_stream(oproxy_process: Daemon) -> None:
    body = json.dumps(
        {"model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            f"{oproxy_process.url}/v1/chat/completions",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    out = result.stdout.decode()
    assert out.startswith("data: {")
    assert out.endswith("data: [DONE]\n\n")
