"""
The APIs agents speak, end to end: the real daemon in front of the fake
Ollama and the fake OpenAI-compatible server (``twistd`` processes), driven
by the official ``openai`` SDK's Responses client and the official
``anthropic`` SDK, as Codex, the openai-agents SDK and Claude Code would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.e2e.conftest import Daemon, free_port, start_twistd
from tests.openai_schema import assert_valid

KEY = "sk-agents-e2e"
OTHER = "sk-agents-other"
TIGHT = "sk-agents-tight"

WEATHER_FUNCTION = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": WEATHER_FUNCTION["parameters"],
}


@pytest.fixture(scope="module")
def fake_openai_process(workdir: Path) -> Iterator[Daemon]:
    port = free_port()
    daemon = start_twistd(
        ["oproxy-fake-openai", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        port,
        workdir,
        "fake-openai",
    )
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def daemon(
    workdir: Path, fake_ollama_process: Daemon, fake_openai_process: Daemon
) -> Iterator[Daemon]:
    port = free_port()
    config = workdir / "agents.yaml"
    config.write_text(
        f"""
listen: ["tcp:{port}:interface=127.0.0.1"]
backends:
  - {{name: local, type: ollama, url: "{fake_ollama_process.url}"}}
  - {{name: compatible, type: openai, url: "{fake_openai_process.url}/v1"}}
auth:
  keys:
    - {{name: agent, key: "{KEY}"}}
    - {{name: other, key: "{OTHER}"}}
    - {{name: tight, key: "{TIGHT}", rpm: 1}}
"""
    )
    running = start_twistd(["oproxy", "--config", str(config)], port, workdir, "agents")
    yield running
    running.stop()
    assert KEY not in running.log.read_text()


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=KEY, max_retries=0) as made:
        yield made


@pytest.fixture(scope="module")
def claude(daemon: Daemon) -> Iterator[anthropic.Anthropic]:
    # Claude Code's ANTHROPIC_BASE_URL is the server, without /v1.
    with anthropic.Anthropic(base_url=daemon.url, api_key=KEY, max_retries=0) as made:
        yield made


MODELS = ["llama3.2", "gpt-fake"]  # the fake Ollama's, the fake OpenAI server's


# -- the Responses API, with the openai SDK ----------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_responses_create_retrieve_and_chain(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(
        model=model, input="My name is Ada.", instructions="Be brief.", max_output_tokens=100
    )
    assert first.status == "completed" and first.output_text
    assert first.usage is not None and first.usage.total_tokens > 0
    assert_valid("Response", first.model_dump(mode="json", exclude_unset=True))
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(
        model=model, input="What is my name?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    items = client.responses.input_items.list(second.id)
    assert [item.type for item in items.data] == ["message"]
    deleted = client.responses.delete(first.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


@pytest.mark.parametrize("model", MODELS)
def test_responses_stream_helper(client: openai.OpenAI, model: str) -> None:
    whole = client.responses.create(model=model, input="Tell me a story")
    with client.responses.stream(model=model, input="Tell me a story") as stream:
        text = "".join(
            event.delta for event in stream if event.type == "response.output_text.delta"
        )
        final = stream.get_final_response()
    assert text == final.output_text == whole.output_text
    assert final.status == "completed"


def test_responses_raw_stream(client: openai.OpenAI) -> None:
    kinds = [
        event.type for event in client.responses.create(model="llama3.2", input="Hi", stream=True)
    ]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds


@pytest.mark.parametrize("model", MODELS)
def test_responses_tool_round_trip(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(
        model=model,
        input="Weather in Tokyo?",
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    final = client.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain, 12C"}],
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
    )
    assert "rain, 12C" in final.output_text


def test_responses_tool_call_streamed(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="gpt-fake",
        input="Weather?",
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_response()
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert json.loads(call.arguments)["city"]


def test_responses_of_another_key_are_not_found(client: openai.OpenAI, daemon: Daemon) -> None:
    made = client.responses.create(model="llama3.2", input="A secret.")
    with openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=OTHER, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model="llama3.2", input="And?", previous_response_id=made.id)


def test_responses_errors(client: openai.OpenAI, daemon: Daemon) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="Hi")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="llama3.2", input="Hi", tools=[{"type": "web_search"}])
    assert caught.value.param == "tools.0.type"  # type: ignore[attr-defined]
    wrong = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="sk-wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.responses.create(model="llama3.2", input="Hi")


# -- the Messages API, with the anthropic SDK ----------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_messages_create(claude: anthropic.Anthropic, model: str) -> None:
    message = claude.messages.create(
        model=model,
        max_tokens=200,
        system="Be brief.",
        messages=[{"role": "user", "content": "Why is the sky blue?"}],
    )
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens > 0
    assert message._request_id


@pytest.mark.parametrize("model", MODELS)
def test_messages_stream_helper(claude: anthropic.Anthropic, model: str) -> None:
    question = [{"role": "user", "content": "Tell me a story"}]
    whole = claude.messages.create(model=model, max_tokens=200, messages=question)  # type: ignore[arg-type]
    with claude.messages.stream(model=model, max_tokens=200, messages=question) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_messages_tool_use_round_trip(claude: anthropic.Anthropic, model: str) -> None:
    question = {"role": "user", "content": "Weather in Oslo?"}
    first = claude.messages.create(
        model=model,
        max_tokens=200,
        messages=[question],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert first.stop_reason == "tool_use"
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert use.name == "get_weather" and "city" in use.input  # type: ignore[operator]
    final = claude.messages.create(
        model=model,
        max_tokens=200,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[
            question,  # type: ignore[list-item]
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "rain, 12C"}],
            },
        ],
    )
    assert "rain, 12C" in final.content[0].text  # type: ignore[union-attr]
    # Streamed, the helper gathers the call's input from its JSON fragments.
    with claude.messages.stream(
        model=model,
        max_tokens=200,
        messages=[question],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    ) as stream:
        streamed = stream.get_final_message()
    (use,) = [block for block in streamed.content if block.type == "tool_use"]
    assert use.input["city"]  # type: ignore[index]


def test_messages_with_thinking(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="qwen3",
        max_tokens=400,
        thinking={"type": "enabled", "budget_tokens": 2048},
        messages=[{"role": "user", "content": "Why?"}],
    )
    assert [block.type for block in message.content] == ["thinking", "text"]


def test_messages_count_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model="llama3.2", messages=[{"role": "user", "content": "x" * 400}]
    )
    assert 90 < counted.input_tokens < 120


def test_messages_errors_are_the_sdks_exceptions(
    claude: anthropic.Anthropic, daemon: Daemon
) -> None:
    hello = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=10, messages=hello)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model="llama3.2",
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "x"},
                        }
                    ],
                }
            ],  # type: ignore[list-item]
        )
    wrong = anthropic.Anthropic(base_url=daemon.url, api_key="sk-wrong", max_retries=0)
    with wrong, pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model="llama3.2", max_tokens=10, messages=hello)  # type: ignore[arg-type]
    # Claude Code's ANTHROPIC_AUTH_TOKEN is sent as a bearer token.
    with anthropic.Anthropic(base_url=daemon.url, auth_token=KEY, max_retries=0) as bearer:
        assert bearer.messages.create(model="llama3.2", max_tokens=10, messages=hello)  # type: ignore[arg-type]
    with anthropic.Anthropic(base_url=daemon.url, api_key=TIGHT, max_retries=0) as tight:
        tight.messages.create(model="llama3.2", max_tokens=10, messages=hello)  # type: ignore[arg-type]
        with pytest.raises(anthropic.RateLimitError):
            tight.messages.create(model="llama3.2", max_tokens=10, messages=hello)  # type: ignore[arg-type]
