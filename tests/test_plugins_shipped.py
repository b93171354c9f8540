"""
The shipped plugins that change or refuse requests: ``system-prompt``,
``block-words`` and ``max-tokens-cap`` (``pii-redact`` and ``webhook``
have files of their own).
"""

from __future__ import annotations

from typing import Any

import pytest

from oproxy.config.reading import structure
from oproxy.config.values import ConfigError
from oproxy.errors import InvalidRequest
from oproxy.plugins.block_words import BlockWords, BlockWordsOptions
from oproxy.plugins.interface import Exchange
from oproxy.plugins.max_tokens_cap import MaxTokensCap, MaxTokensCapOptions
from oproxy.plugins.system_prompt import SystemPrompt, SystemPromptOptions


def exchange(route: str) -> Exchange:
    api = "ollama" if route.startswith("/api/") else "openai"
    return Exchange(route, api, "alice", "m", "req_1", 0.0)


def chat(*contents: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": c} for c in contents]}


# -- system-prompt ---------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
def test_a_system_message_goes_first_or_last(route: str) -> None:
    first = SystemPrompt(structure({"text": "Be brief."}, SystemPromptOptions))
    body = chat("hi", "and?")
    first.on_request(exchange(route), body)
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert len(body["messages"]) == 3
    last = SystemPrompt(structure({"text": "Cite.", "position": "append"}, SystemPromptOptions))
    last.on_request(exchange(route), body)
    assert body["messages"][-1] == {"role": "system", "content": "Cite."}


def test_generate_gets_it_in_its_system_field() -> None:
    first = SystemPrompt(structure({"text": "Be brief."}, SystemPromptOptions))
    body: dict[str, Any] = {"model": "m", "prompt": "hi"}
    first.on_request(exchange("/api/generate"), body)
    assert body["system"] == "Be brief."
    body = {"model": "m", "prompt": "hi", "system": "You are a cat."}
    first.on_request(exchange("/api/generate"), body)
    assert body["system"] == "Be brief.\n\nYou are a cat."
    last = SystemPrompt(structure({"text": "Purr.", "position": "append"}, SystemPromptOptions))
    last.on_request(exchange("/api/generate"), body)
    assert body["system"] == "Be brief.\n\nYou are a cat.\n\nPurr."


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/embeddings", "/api/embed"])
def test_other_routes_are_left_alone(route: str) -> None:
    plugin = SystemPrompt(structure({"text": "Be brief."}, SystemPromptOptions))
    body = {"model": "m", "prompt": "hi", "input": "x"}
    plugin.on_request(exchange(route), body)
    assert body == {"model": "m", "prompt": "hi", "input": "x"}


def test_system_prompt_options() -> None:
    with pytest.raises(ConfigError, match="text: is required"):
        structure({}, SystemPromptOptions)
    with pytest.raises(ConfigError, match="position: must be one of prepend, append"):
        structure({"text": "x", "position": "middle"}, SystemPromptOptions)


# -- block-words -----------------------------------------------------------------------


def blocker(**options: Any) -> BlockWords:
    return BlockWords(structure(options, BlockWordsOptions))


@pytest.mark.parametrize(
    ("body", "blocked"),
    [
        (chat("Tell me about the Forbidden-Topic, please"), True),
        (chat("forbidden-topics are fine"), False),  # whole words only
        (chat("nothing to see"), False),
        ({"model": "m", "prompt": ["ok", "a FORBIDDEN-TOPIC here"]}, True),
        ({"model": "m", "input": "forbidden-topic"}, True),
        ({"model": "m", "prompt": "x", "system": "forbidden-topic"}, True),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "c++ is fun"}]}],
            },
            True,
        ),
        (chat("abc++ is not c"), False),
    ],
)
def test_blocked_words_refuse_the_request(body: dict[str, Any], blocked: bool) -> None:
    plugin = blocker(patterns=["forbidden-topic", "c++"])
    if not blocked:
        plugin.on_request(exchange("/v1/chat/completions"), body)
        return
    with pytest.raises(InvalidRequest) as raised:
        plugin.on_request(exchange("/v1/chat/completions"), body)
    assert raised.value.status == 400 and raised.value.code == "content_blocked"
    assert "forbidden" not in raised.value.message.lower()  # what matched is not repeated


def test_regular_expressions_and_a_message_of_ones_own() -> None:
    plugin = blocker(patterns=[r"\bproject\s+\w+\b"], regex=True, message="Not here.")
    with pytest.raises(InvalidRequest, match=r"^Not here\.$"):
        plugin.on_request(exchange("/api/chat"), chat("about PROJECT titan"))
    plugin.on_request(exchange("/api/chat"), chat("a projection"))


def test_block_words_options() -> None:
    with pytest.raises(ConfigError) as raised:
        structure({"patterns": []}, BlockWordsOptions)
    assert raised.value.key == "patterns"
    with pytest.raises(ConfigError) as raised:
        structure({"patterns": ["ok", "(x"], "regex": True}, BlockWordsOptions)
    assert raised.value.key == "patterns[1]"
    structure({"patterns": ["(x"]}, BlockWordsOptions)  # words are words


# -- max-tokens-cap --------------------------------------------------------------------


def cap(limit: int = 100) -> MaxTokensCap:
    return MaxTokensCap(structure({"max_tokens": limit}, MaxTokensCapOptions))


@pytest.mark.parametrize(
    ("given", "capped"),
    [
        ({}, {"max_tokens": 100}),
        ({"max_tokens": 50}, {"max_tokens": 50}),
        ({"max_tokens": 500}, {"max_tokens": 100}),
        ({"max_tokens": None}, {"max_tokens": 100}),
        ({"max_completion_tokens": 500}, {"max_completion_tokens": 100}),
        (
            {"max_tokens": 20, "max_completion_tokens": 500},
            {"max_tokens": 20, "max_completion_tokens": 100},
        ),
        ({"max_tokens": "lots"}, {"max_tokens": "lots"}),  # the route refuses it
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_openai_requests_are_capped(
    route: str, given: dict[str, Any], capped: dict[str, Any]
) -> None:
    body = {"model": "m", **given}
    cap().on_request(exchange(route), body)
    assert body == {"model": "m", **capped}


@pytest.mark.parametrize(
    ("options", "capped"),
    [
        (None, {"num_predict": 100}),
        ({}, {"num_predict": 100}),
        ({"temperature": 0, "num_predict": 10}, {"temperature": 0, "num_predict": 10}),
        ({"num_predict": 1000}, {"num_predict": 100}),
        ({"num_predict": -1}, {"num_predict": 100}),
        ({"num_predict": -2}, {"num_predict": 100}),
    ],
)
@pytest.mark.parametrize("route", ["/api/chat", "/api/generate"])
def test_ollama_requests_are_capped(route: str, options: Any, capped: dict[str, Any]) -> None:
    body: dict[str, Any] = {"model": "m"}
    if options is not None:
        body["options"] = options
    cap().on_request(exchange(route), body)
    assert body["options"] == capped


@pytest.mark.parametrize("route", ["/v1/embeddings", "/api/embed", "/api/show"])
def test_routes_that_do_not_generate_are_left_alone(route: str) -> None:
    body = {"model": "m", "input": "x"}
    cap().on_request(exchange(route), body)
    assert body == {"model": "m", "input": "x"}


def test_max_tokens_cap_options() -> None:
    with pytest.raises(ConfigError, match="max_tokens: is required"):
        structure({}, MaxTokensCapOptions)
    with pytest.raises(ConfigError, match="max_tokens: must be a positive whole number"):
        structure({"max_tokens": 0}, MaxTokensCapOptions)
