"""
Tests for :mod:`oproxy.translate.chat` and the shared :mod:`oproxy.translate.common`.

Example tests pin exact outputs for each mapping and each fix of a weak spot
of Ollama's own /v1 layer; property tests throw wide inputs at the
translators and check that every produced object is valid OpenAI.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oproxy.errors import InvalidRequest, UpstreamError
from oproxy.translate.chat import (
    ChatStreamTranslator,
    chat_request_to_ollama,
    ollama_chat_to_openai,
    remote_image_urls,
)
from oproxy.translate.common import (
    SYSTEM_FINGERPRINT,
    created_from_ollama,
    native_extras,
    new_completion_id,
    sampling_options,
    usage_from_ollama,
)
from tests.openai_schema import assert_valid, assert_valid_sse, to_sse

# A 1x1 PNG: images are checked, so a signature alone is refused.
PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
CHUNK = "CreateChatCompletionStreamResponse"
RESPONSE = "CreateChatCompletionResponse"


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def request(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "client-name", "messages": list(messages or [user("Hi")]), **fields}


def translate(body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return chat_request_to_ollama(body, model="upstream", **kwargs)


def rejected(body: Any, **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        chat_request_to_ollama(body, model="upstream", **kwargs)
    return info.value


def image_part(url: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


# ==========================================================================
# common: ids, timestamps, usage


def test_completion_ids_are_prefixed_unique_and_long() -> None:
    ids = {new_completion_id("chatcmpl-") for _ in range(1000)}
    assert len(ids) == 1000
    for completion_id in ids:
        assert re.fullmatch(r"chatcmpl-[A-Za-z0-9]{24}", completion_id)


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2024-07-01T12:00:00.123456789Z", 1719835200),
        ("2025-05-04T17:37:44.706015396-07:00", 1746405464),
        ("2024-07-01T17:30:00+05:30", 1719835200),
        ("2024-07-01T12:00:00Z", 1719835200),
        ("2024-07-01T12:00:00", 1719835200),
        ("0001-01-01T00:00:00Z", 42),
        ("yesterday", 42),
        ("", 42),
        (None, 42),
        (1719835200, 42),
    ],
)
def test_created_from_ollama(timestamp: Any, expected: int) -> None:
    assert created_from_ollama(timestamp, 42) == expected


def test_usage_from_ollama_defaults_missing_counts_to_zero() -> None:
    assert usage_from_ollama({"prompt_eval_count": 26, "eval_count": 282}) == {
        "prompt_tokens": 26,
        "completion_tokens": 282,
        "total_tokens": 308,
    }
    assert usage_from_ollama({"eval_count": 5}) == {
        "prompt_tokens": 0,
        "completion_tokens": 5,
        "total_tokens": 5,
    }
    assert usage_from_ollama({"prompt_eval_count": True, "eval_count": "3"}) == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }


# ==========================================================================
# common: sampling options and Ollama extras


def test_absent_sampling_fields_send_no_options() -> None:
    """Weak spot 3: Ollama's /v1 sends temperature and top_p 1.0 when absent."""
    assert translate(request(user("Hello"))) == {
        "model": "upstream",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": False,
    }


def test_sampling_fields_map_to_options() -> None:
    body = {
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n", "END"],
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "max_tokens": 64,
    }
    assert sampling_options(body) == {
        "temperature": 0.2,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "seed": 7,
        "stop": ["\n", "END"],
        "num_predict": 64,
    }


def test_max_completion_tokens_is_preferred_over_max_tokens() -> None:
    """Weak spot 2: Ollama's /v1 ignores max_completion_tokens."""
    assert sampling_options({"max_completion_tokens": 10}) == {"num_predict": 10}
    assert sampling_options({"max_completion_tokens": 10, "max_tokens": 99}) == {"num_predict": 10}


def test_stop_string_becomes_a_list_and_null_fields_are_absent() -> None:
    assert sampling_options({"stop": "END", "temperature": None, "seed": None}) == {"stop": ["END"]}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"temperature": "0.5"}, "temperature", "invalid_type"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"top_p": -0.1}, "top_p", "invalid_value"),
        ({"seed": 1.5}, "seed", "invalid_type"),
        ({"seed": 2**70}, "seed", "invalid_value"),
        ({"stop": ["a", 1]}, "stop", "invalid_type"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"stop": 3}, "stop", "invalid_type"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_completion_tokens": False}, "max_completion_tokens", "invalid_type"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty", "invalid_value"),
    ],
)
def test_bad_sampling_fields_are_refused(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        sampling_options(body)
    assert (info.value.param, info.value.code) == (param, code)


def test_sampling_param_prefix_names_nested_fields() -> None:
    with pytest.raises(InvalidRequest) as info:
        sampling_options({"top_p": "high"}, param_prefix="defaults.")
    assert info.value.param == "defaults.top_p"


def test_native_options_pass_through_and_keep_alive_is_lifted() -> None:
    """Weak spot 16: num_ctx and friends cannot be set through Ollama's /v1."""
    body = {
        "options": {
            "num_ctx": 8192,
            "top_k": 20,
            "min_p": 0.05,
            "repeat_penalty": 1.1,
            "mirostat": 2,
            "keep_alive": "10m",
        }
    }
    assert native_extras(body) == (
        {"num_ctx": 8192, "top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1, "mirostat": 2},
        {"keep_alive": "10m"},
    )


def test_top_level_keep_alive_wins_over_the_option() -> None:
    body = {"keep_alive": -1, "options": {"keep_alive": "10m"}}
    assert native_extras(body) == ({}, {"keep_alive": -1})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"options": "fast"}, "options"),
        ({"options": {"num_ctx": "8k"}}, "options.num_ctx"),
        ({"options": {"num_ctx": True}}, "options.num_ctx"),
        ({"options": {"min_p": "low"}}, "options.min_p"),
        ({"options": {"use_mmap": 1}}, "options.use_mmap"),
        ({"options": {"stop": [1]}}, "options.stop.0"),
        ({"options": {"keep_alive": "5 minutes"}}, "options.keep_alive"),
        ({"keep_alive": "300"}, "keep_alive"),
        ({"keep_alive": True}, "keep_alive"),
    ],
)
def test_bad_native_extras_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        native_extras(body)
    assert info.value.param == param


def test_openai_fields_win_over_the_same_native_option() -> None:
    body = request(
        temperature=0.1, max_tokens=5, options={"temperature": 0.9, "num_predict": 50, "top_k": 3}
    )
    assert translate(body)["options"] == {"temperature": 0.1, "num_predict": 5, "top_k": 3}


def test_native_extras_reach_the_chat_body() -> None:
    body = request(options={"num_ctx": 4096, "keep_alive": "1h"})
    native = translate(body)
    assert native["options"] == {"num_ctx": 4096}
    assert native["keep_alive"] == "1h"


# ==========================================================================
# Request: messages and content


def test_stream_flag_is_always_explicit() -> None:
    assert translate(request(stream=True))["stream"] is True
    assert translate(request(stream=None))["stream"] is False
    assert rejected(request(stream="yes")).param == "stream"


def test_text_parts_are_concatenated_into_one_message() -> None:
    """Weak spot 12: Ollama's /v1 makes one message per part."""
    content = [
        {"type": "text", "text": "Describe"},
        image_part(f"data:image/png;base64,{PNG_B64}"),
        {"type": "text", "text": "briefly."},
        image_part(f"data:image/jpeg;base64,{PNG_B64}"),
    ]
    assert translate(request(user(content)))["messages"] == [
        {"role": "user", "content": "Describe\nbriefly.", "images": [PNG_B64, PNG_B64]}
    ]


@pytest.mark.parametrize(
    "prefix",
    [
        "data:image/jpeg;base64,",
        "data:image/jpg;base64,",
        "data:image/png;base64,",
        "data:image/webp;base64,",
        "data:image/gif;base64,",
        "data:image/PNG;base64,",
        "data:;base64,",
    ],
)
def test_data_url_images_become_bare_base64(prefix: str) -> None:
    """Weak spot 10 (in part): gif is accepted too."""
    native = translate(request(user([image_part(prefix + PNG_B64)])))
    assert native["messages"] == [{"role": "user", "content": "", "images": [PNG_B64]}]


def test_image_url_may_be_a_bare_string_and_base64_is_canonicalised() -> None:
    split = PNG_B64[:12] + "\n" + PNG_B64[12:].rstrip("=")
    part = {"type": "image_url", "image_url": "data:image/png;base64," + split}
    assert translate(request(user([part])))["messages"][0]["images"] == [PNG_B64]


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,not base64!",
        "data:image/png;base64,",
        "data:image/png;base64,A",
        "data:image/png,iVBORw0KGgo=",
        "ftp://example.com/cat.png",
        "cat.png",
    ],
)
def test_bad_images_are_refused_naming_the_part(url: str) -> None:
    error = rejected(request(user([{"type": "text", "text": "x"}, image_part(url)])))
    assert error.param == "messages.0.content.1.image_url"
    assert error.code == "invalid_value"


def test_remote_images_come_from_the_fetched_map() -> None:
    """Weak spot 10: Ollama's /v1 refuses image URLs; the HTTP layer fetches them."""
    url = "https://example.com/cat.png"
    native = translate(request(user([image_part(url)])), fetched_images={url: "Q0FU"})
    assert native["messages"][0]["images"] == ["Q0FU"]


def test_a_remote_image_that_was_not_fetched_is_refused() -> None:
    error = rejected(request(user([image_part("http://example.com/a.png")])))
    assert error.param == "messages.0.content.0.image_url"


def test_remote_image_urls_are_listed_once_in_order() -> None:
    body = request(
        user([image_part("https://a.example/1.png"), image_part("HTTP://b.example/2.png")]),
        user([image_part("https://a.example/1.png"), image_part(f"data:;base64,{PNG_B64}")]),
        user([{"type": "image_url", "image_url": "https://c.example/3.png"}]),
    )
    assert remote_image_urls(body) == [
        "https://a.example/1.png",
        "HTTP://b.example/2.png",
        "https://c.example/3.png",
    ]


def test_remote_image_urls_of_a_plain_request_is_empty() -> None:
    assert remote_image_urls(request(user("Hi"))) == []
    assert remote_image_urls({"messages": "not a list"}) == []


def test_a_bad_request_is_refused_before_any_image_is_fetched() -> None:
    body = request(user([image_part("https://a.example/1.png")]), temperature="hot")
    with pytest.raises(InvalidRequest) as info:
        remote_image_urls(body)
    assert info.value.param == "temperature"


def test_input_audio_parts_travel_as_images() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    assert translate(request(user([part])))["messages"][0]["images"] == ["UklGRg=="]


def test_assistant_content_null_without_tool_calls_is_accepted() -> None:
    """Weak spot 5: Ollama's /v1 answers 400 'invalid message content type: <nil>'."""
    body = request(user("Hi"), {"role": "assistant", "content": None}, user("Again"))
    assert translate(body)["messages"][1] == {"role": "assistant", "content": ""}
    body = request(user("Hi"), {"role": "assistant"}, user("Again"))
    assert translate(body)["messages"][1] == {"role": "assistant", "content": ""}


def test_developer_becomes_system() -> None:
    """Weak spot 13: Go-template models ignore a role they do not know."""
    body = request({"role": "developer", "content": "Be terse."}, user("Hi"))
    assert translate(body)["messages"][0] == {"role": "system", "content": "Be terse."}


def test_name_is_dropped_except_on_tool_messages() -> None:
    body = request(
        {"role": "system", "content": "s", "name": "boss"},
        {"role": "user", "content": "u", "name": "alice"},
        {"role": "tool", "content": "42", "name": "lookup", "tool_call_id": "call_1"},
    )
    assert translate(body)["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "tool", "content": "42", "tool_name": "lookup", "tool_call_id": "call_1"},
    ]


def assistant_call(call_id: str, name: str, arguments: Any = "{}") -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        ],
    }


def test_tool_results_take_their_name_from_the_latest_matching_call() -> None:
    body = request(
        user("Weather?"),
        assistant_call("call_1", "old_name"),
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        assistant_call("call_1", "get_weather", '{"city": "Paris"}'),
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "rain"}]},
        {"role": "tool", "tool_call_id": "unknown", "content": "?"},
    )
    messages = translate(body)["messages"]
    assert messages[3] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    }
    assert messages[4] == {
        "role": "tool",
        "content": "rain",
        "tool_name": "get_weather",
        "tool_call_id": "call_1",
    }
    assert messages[5] == {"role": "tool", "content": "?", "tool_call_id": "unknown"}


def test_assistant_text_with_tool_calls_and_thinking() -> None:
    message = assistant_call("c", "f", "")
    message["content"] = "Let me check."
    message["reasoning_content"] = "The user wants f."
    assert translate(request(user("x"), message))["messages"][1] == {
        "role": "assistant",
        "content": "Let me check.",
        "thinking": "The user wants f.",
        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}],
    }


def test_ollama_style_reasoning_field_becomes_thinking() -> None:
    message = {"role": "assistant", "content": "4", "reasoning": "2+2"}
    assert translate(request(user("x"), message))["messages"][1]["thinking"] == "2+2"


@pytest.mark.parametrize("arguments", ['{"a": ', "[1, 2]", "42", 42, None])
def test_bad_tool_call_arguments_are_refused(arguments: Any) -> None:
    error = rejected(request(user("x"), assistant_call("c", "f", arguments)))
    assert error.param == "messages.1.tool_calls.0.function.arguments"


@pytest.mark.parametrize(
    ("messages", "param", "code"),
    [
        ([], "messages", "invalid_value"),
        ("hello", "messages", "invalid_type"),
        (["hello"], "messages.0", "invalid_type"),
        ([{"content": "x"}], "messages.0.role", "missing_required_parameter"),
        ([{"role": "robot", "content": "x"}], "messages.0.role", "invalid_value"),
        ([{"role": "user"}], "messages.0.content", "missing_required_parameter"),
        ([{"role": "user", "content": None}], "messages.0.content", "invalid_type"),
        ([{"role": "user", "content": 3}], "messages.0.content", "invalid_type"),
        ([{"role": "user", "content": [{"text": "x"}]}], "messages.0.content.0.type", None),
        ([user([{"type": "text", "text": 3}])], "messages.0.content.0.text", "invalid_type"),
        ([user([{"type": "video"}])], "messages.0.content.0.type", "invalid_value"),
        ([user([{"type": "file", "file": {}}])], "messages.0.content.0.type", None),
        ([user([{"type": "image_url"}])], "messages.0.content.0.image_url", None),
        (
            [user([{"type": "image_url", "image_url": {}}])],
            "messages.0.content.0.image_url.url",
            None,
        ),
        ([{"role": "tool", "content": "x", "tool_call_id": 5}], "messages.0.tool_call_id", None),
        ([{"role": "assistant", "tool_calls": {}}], "messages.0.tool_calls", "invalid_type"),
        ([{"role": "assistant", "reasoning_content": 1}], "messages.0.reasoning_content", None),
    ],
)
def test_bad_messages_name_the_field(messages: Any, param: str, code: str | None) -> None:
    error = rejected({"model": "m", "messages": messages})
    assert error.param == param
    if code is not None:
        assert error.code == code


def test_missing_messages_is_a_missing_parameter() -> None:
    error = rejected({"model": "m"})
    assert (error.param, error.code) == ("messages", "missing_required_parameter")


def test_a_body_that_is_not_an_object_is_refused() -> None:
    assert isinstance(rejected([1, 2]), InvalidRequest)
    with pytest.raises(InvalidRequest):
        remote_image_urls("not an object")  # type: ignore[arg-type]


# ==========================================================================
# Request: tools, tool_choice, response_format, reasoning, the rest


def tool(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} things",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            "strict": True,
        },
    }


def native_tool(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} things",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }


@pytest.mark.parametrize("choice", [None, "auto", "required"])
def test_tools_pass_through(choice: str | None) -> None:
    native = translate(request(tools=[tool("a"), tool("b")], tool_choice=choice))
    assert native["tools"] == [native_tool("a"), native_tool("b")]


def test_tool_choice_none_drops_the_tools() -> None:
    """Weak spot 1: Ollama ignores tool_choice; 'none' is emulated."""
    assert "tools" not in translate(request(tools=[tool("a")], tool_choice="none"))


def test_a_forced_function_keeps_only_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "b"}}
    native = translate(request(tools=[tool("a"), tool("b")], tool_choice=choice))
    assert native["tools"] == [native_tool("b")]


def test_allowed_tools_keep_the_listed_tools() -> None:
    choice = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "auto",
            "tools": [{"type": "function", "function": {"name": "c"}}],
        },
    }
    native = translate(request(tools=[tool("a"), tool("c")], tool_choice=choice))
    assert native["tools"] == [native_tool("c")]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [tool("a")], "tool_choice": {"type": "function", "function": {"name": "z"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [tool("a")], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [tool("a")], "tool_choice": {"type": "magic"}}, "tool_choice.type"),
        ({"tools": [tool("a")], "tool_choice": {"type": "function"}}, "tool_choice.function"),
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": 1}}]}, "tools.0.function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools.0.function.parameters",
        ),
    ],
)
def test_bad_tools_are_refused(fields: dict[str, Any], param: str) -> None:
    assert rejected(request(**fields)).param == param


def test_response_format_maps_to_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_schema = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": schema, "strict": True},
    }
    assert translate(request(response_format={"type": "json_object"}))["format"] == "json"
    assert translate(request(response_format=json_schema))["format"] == schema
    assert "format" not in translate(request(response_format={"type": "text"}))


def test_native_format_passes_through_unless_response_format_is_given() -> None:
    assert translate(request(format="json"))["format"] == "json"
    assert translate(request(format={"type": "object"}))["format"] == {"type": "object"}
    both = request(
        format="json", response_format={"type": "json_schema", "json_schema": {"schema": {}}}
    )
    assert translate(both)["format"] == {}


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x"}},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "yaml"}, "response_format.type"),
        ({}, "response_format.type"),
        ("json", "response_format"),
    ],
)
def test_bad_response_formats_are_refused(response_format: Any, param: str) -> None:
    assert rejected(request(response_format=response_format)).param == param


@pytest.mark.parametrize(
    ("effort", "think"),
    [
        ("none", False),
        ("minimal", "low"),
        ("low", "low"),
        ("medium", "medium"),
        ("high", "high"),
        ("xhigh", "high"),
        ("ultra", "high"),
        ("max", "high"),
    ],
)
def test_reasoning_effort_maps_to_think(effort: str, think: bool | str) -> None:
    assert translate(request(reasoning_effort=effort))["think"] == think


def test_reasoning_object_effort_wins() -> None:
    body = request(reasoning_effort="high", reasoning={"effort": "none"})
    assert translate(body)["think"] is False


def test_invalid_effort_is_refused() -> None:
    assert rejected(request(reasoning_effort="extreme")).param == "reasoning_effort"
    assert rejected(request(reasoning_effort=3)).param == "reasoning_effort"


def test_native_think_only_without_an_effort() -> None:
    assert translate(request(think=True))["think"] is True
    assert translate(request(think="low", reasoning_effort="none"))["think"] is False
    assert "think" not in translate(request())
    assert rejected(request(think="lots")).param == "think"


def test_stream_options_are_checked() -> None:
    assert "stream_options" not in translate(
        request(stream=True, stream_options={"include_usage": True})
    )
    assert (
        rejected(request(stream_options={"include_usage": "yes"})).param
        == "stream_options.include_usage"
    )
    assert rejected(request(stream_options=True)).param == "stream_options"


def test_logprobs_pass_through() -> None:
    native = translate(request(logprobs=True, top_logprobs=3))
    assert (native["logprobs"], native["top_logprobs"]) == (True, 3)
    assert rejected(request(logprobs=True, top_logprobs=21)).param == "top_logprobs"
    assert rejected(request(logprobs="yes")).param == "logprobs"


def test_n_is_checked_but_never_sent() -> None:
    # One native call makes one choice; the HTTP layer makes one call per choice.
    assert translate(request(n=3)) == translate(request(n=1)) == translate(request())
    assert "n" not in translate(request(n=2))
    assert rejected(request(n=0)).param == "n"
    assert rejected(request(n=True)).param == "n"


def test_unknown_fields_are_ignored() -> None:
    body = request(user="u-1", metadata={"a": "b"}, store=False, service_tier="auto", whatever=[1])
    assert translate(body) == translate(request())


# ==========================================================================
# Response: non-streamed


def native_response(message: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "created_at": "2024-07-01T12:00:00.1Z",
        "message": {"role": "assistant", **message},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 26,
        "eval_count": 4,
        **fields,
    }


def to_openai(native: dict[str, Any]) -> dict[str, Any]:
    result = ollama_chat_to_openai(
        native, completion_id="chatcmpl-abc", model="m", created=1719835200
    )
    assert_valid(RESPONSE, result)
    return result


def test_a_text_answer() -> None:
    assert to_openai(native_response({"content": "Hello!"})) == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1719835200,
        "model": "m",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 26, "completion_tokens": 4, "total_tokens": 30},
    }


def test_a_tool_call_turn_has_null_content_and_finishes_with_tool_calls() -> None:
    calls = [
        {
            "id": "call_k3j9x0ab",
            "function": {
                "index": 0,
                "name": "get_weather",
                "arguments": {"city": "Tokyo", "days": 2},
            },
        },
        {"function": {"index": 1, "name": "now", "arguments": {}}},
    ]
    choice = to_openai(native_response({"content": "", "tool_calls": calls}))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    first, second = message["tool_calls"]
    assert first == {
        "id": "call_k3j9x0ab",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Tokyo","days":2}'},
    }
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", second["id"])
    assert second["function"] == {"name": "now", "arguments": "{}"}


def test_length_wins_over_tool_calls() -> None:
    native = native_response(
        {"content": "", "tool_calls": [{"function": {"name": "f"}}]}, done_reason="length"
    )
    assert to_openai(native)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("done_reason", "expected"),
    [("stop", "stop"), ("length", "length"), ("load", "stop"), (None, "stop")],
)
def test_done_reason_maps_to_finish_reason(done_reason: Any, expected: str) -> None:
    native = native_response({"content": "x"}, done_reason=done_reason)
    assert to_openai(native)["choices"][0]["finish_reason"] == expected


def test_thinking_is_returned_as_reasoning_content() -> None:
    """Weak spot 4: clients look for reasoning_content, not Ollama's reasoning."""
    message = to_openai(native_response({"content": "4", "thinking": "2+2=4"}))["choices"][0][
        "message"
    ]
    assert message == {
        "role": "assistant",
        "content": "4",
        "refusal": None,
        "reasoning_content": "2+2=4",
    }
    message = to_openai(native_response({"content": "4", "thinking": ""}))["choices"][0]["message"]
    assert "reasoning_content" not in message


NATIVE_LOGPROBS = [
    {
        "token": "Hi",
        "logprob": -0.1,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
            {"token": "Yo", "logprob": -2.5},
        ],
    },
]
OPENAI_LOGPROBS = {
    "content": [
        {
            "token": "Hi",
            "logprob": -0.1,
            "bytes": [72, 105],
            "top_logprobs": [
                {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                {"token": "Yo", "logprob": -2.5, "bytes": None},
            ],
        }
    ],
    "refusal": None,
}


def test_logprobs_are_converted() -> None:
    choice = to_openai(native_response({"content": "Hi"}, logprobs=NATIVE_LOGPROBS))["choices"][0]
    assert choice["logprobs"] == OPENAI_LOGPROBS


def test_missing_counts_still_give_usage() -> None:
    native = {"message": {"content": "x"}, "done": True}
    assert to_openai(native)["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
    }


def test_an_upstream_error_body_raises() -> None:
    with pytest.raises(UpstreamError, match="out of memory"):
        ollama_chat_to_openai({"error": "out of memory"}, completion_id="x", model="m", created=1)


# ==========================================================================
# Response: streamed


def line(content: str = "", *, done: bool = False, **message: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "created_at": "2024-07-01T12:00:00.1Z",
        "message": {"role": "assistant", "content": content, **message},
        "done": done,
    }


def done_line(reason: str = "stop", **fields: Any) -> dict[str, Any]:
    return {
        **line(done=True),
        "done_reason": reason,
        "prompt_eval_count": 3,
        "eval_count": 2,
        **fields,
    }


def stream(
    lines: list[dict[str, Any]], *, include_usage: bool = False
) -> tuple[ChatStreamTranslator, list[dict[str, Any]]]:
    translator = ChatStreamTranslator("chatcmpl-5", "m", 1719835200, include_usage=include_usage)
    chunks = [chunk for native in lines for chunk in translator.feed(native)]
    assert_valid_sse(CHUNK, to_sse(chunks))
    return translator, chunks


def choice_of(chunk: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = chunk["choices"][0]
    return choice


def test_a_text_stream_with_usage_matches_openai_exactly() -> None:
    translator, chunks = stream([line("Hel"), line("lo"), done_line()], include_usage=True)
    envelope = {
        "id": "chatcmpl-5",
        "object": "chat.completion.chunk",
        "created": 1719835200,
        "model": "m",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    assert chunks == [
        {
            **envelope,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "Hel"},
                    "finish_reason": None,
                }
            ],
            "usage": None,
        },
        {
            **envelope,
            "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}],
            "usage": None,
        },
        {
            **envelope,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": None,
        },
        {
            **envelope,
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    ]
    assert translator.done
    assert translator.text == "Hello"
    assert translator.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_without_include_usage_chunks_have_no_usage_key() -> None:
    translator, chunks = stream([line("Hi"), done_line()])
    assert [("usage" in chunk) for chunk in chunks] == [False, False]
    assert translator.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_an_empty_completion_still_announces_the_role() -> None:
    _, chunks = stream([done_line()])
    assert [choice_of(chunk)["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {},
    ]


def test_empty_lines_before_the_first_token_send_nothing() -> None:
    translator = ChatStreamTranslator("c", "m", 1, include_usage=False)
    assert translator.feed(line("")) == []
    assert not translator.done and translator.usage is None


def test_thinking_streams_as_reasoning_content_before_the_text() -> None:
    _, chunks = stream([line(thinking="Hmm"), line("4", thinking=" so"), done_line()])
    assert [choice_of(chunk)["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Hmm"},
        {"reasoning_content": " so"},
        {"content": "4"},
        {},
    ]


def test_a_streamed_tool_call_finishes_with_tool_calls() -> None:
    """Weak spot 6: the call comes in a done:false line, the done line says stop."""
    calls_1 = [{"id": "call_a", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}}]
    calls_2 = [
        {"id": "call_b", "function": {"index": 0, "name": "g", "arguments": {}}},
        {"id": "call_c", "function": {"index": 1, "name": "h", "arguments": {"y": [1]}}},
    ]
    _, chunks = stream([line(tool_calls=calls_1), line(tool_calls=calls_2), done_line("stop")])
    deltas = [choice_of(chunk)["delta"] for chunk in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x":1}'},
                }
            ]
        },
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "g", "arguments": "{}"},
                }
            ]
        },
        {
            "tool_calls": [
                {
                    "index": 2,
                    "id": "call_c",
                    "type": "function",
                    "function": {"name": "h", "arguments": '{"y":[1]}'},
                }
            ]
        },
        {},
    ]
    assert choice_of(chunks[-1])["finish_reason"] == "tool_calls"


def test_a_streamed_tool_call_cut_by_length_finishes_with_length() -> None:
    calls = [{"function": {"name": "f", "arguments": {}}}]
    _, chunks = stream([line(tool_calls=calls), done_line("length")])
    assert choice_of(chunks[-1])["finish_reason"] == "length"


def test_streamed_logprobs_ride_on_the_text_chunk() -> None:
    _, chunks = stream([{**line("Hi"), "logprobs": NATIVE_LOGPROBS}, done_line()])
    assert choice_of(chunks[0])["logprobs"] == OPENAI_LOGPROBS
    assert "logprobs" not in choice_of(chunks[1])


def test_an_empty_native_logprobs_list_adds_no_chunk() -> None:
    _, chunks = stream([{**line(""), "logprobs": []}, done_line()])
    assert [choice_of(chunk)["delta"] for chunk in chunks] == [
        {"role": "assistant", "content": ""},
        {},
    ]


def test_an_error_line_mid_stream_raises() -> None:
    """Weak spot 9: Ollama's /v1 swallows it and sends an empty chunk."""
    translator = ChatStreamTranslator("c", "m", 1, include_usage=False)
    translator.feed(line("partial"))
    with pytest.raises(UpstreamError) as info:
        translator.feed({"error": "an error was encountered while running the model"})
    assert info.value.message == "an error was encountered while running the model"
    assert translator.text == "partial"


def test_lines_after_done_are_ignored() -> None:
    translator = ChatStreamTranslator("c", "m", 1, include_usage=True)
    translator.feed(done_line())
    assert translator.feed(line("late")) == []
    assert translator.feed(done_line()) == []


# ==========================================================================
# Properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["", "none", "auto", "function", "text", "json", "user", "data:;base64,QQ=="])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["type", "name", "text", "url", "function", "schema", "effort"])
            | st.text(max_size=5),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)

BASE_BODY: dict[str, Any] = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "s"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "t"},
                image_part(f"data:image/png;base64,{PNG_B64}"),
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": "r"},
    ],
    "tools": [tool("f")],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {"type": "object"}},
    },
    "reasoning": {"effort": "low"},
    "options": {"num_ctx": 2048},
}
FUZZ_PATHS = [
    ("messages",),
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", 1, "content"),
    ("messages", 1, "content", 0),
    ("messages", 1, "content", 1, "image_url"),
    ("messages", 1, "content", 1, "image_url", "url"),
    ("messages", 2, "content"),
    ("messages", 2, "tool_calls"),
    ("messages", 2, "tool_calls", 0, "function"),
    ("messages", 2, "tool_calls", 0, "function", "arguments"),
    ("messages", 2, "reasoning"),
    ("messages", 3, "tool_call_id"),
    ("messages", 3, "name"),
    ("stream",),
    ("stream_options",),
    ("temperature",),
    ("top_p",),
    ("n",),
    ("stop",),
    ("max_tokens",),
    ("max_completion_tokens",),
    ("seed",),
    ("frequency_penalty",),
    ("presence_penalty",),
    ("response_format",),
    ("response_format", "json_schema"),
    ("response_format", "json_schema", "schema"),
    ("tools",),
    ("tools", 0),
    ("tools", 0, "function"),
    ("tools", 0, "function", "name"),
    ("tools", 0, "function", "parameters"),
    ("tool_choice",),
    ("tool_choice", "function"),
    ("reasoning_effort",),
    ("reasoning",),
    ("reasoning", "effort"),
    ("logprobs",),
    ("top_logprobs",),
    ("options",),
    ("options", "num_ctx"),
    ("options", "keep_alive"),
    ("options", "stop"),
    ("options", "anything"),
    ("keep_alive",),
    ("format",),
    ("think",),
    ("user",),
]


def with_value(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    target: Any = changed
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return changed


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FUZZ_PATHS), json_values)
def test_any_json_value_in_any_field_translates_or_is_refused(
    path: tuple[str | int, ...], value: Any
) -> None:
    body = with_value(BASE_BODY, path, value)
    try:
        urls = remote_image_urls(body)
        native = chat_request_to_ollama(body, model="m", fetched_images=dict.fromkeys(urls, "QQ=="))
    except InvalidRequest:
        return
    orjson.dumps(native)
    assert native["model"] == "m"
    assert isinstance(native["stream"], bool)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from([path[0] for path in FUZZ_PATHS]), json_values, max_size=6))
def test_any_body_translates_or_is_refused(fields: dict[str, Any]) -> None:
    with contextlib.suppress(InvalidRequest):
        orjson.dumps(chat_request_to_ollama(fields, model="m"))


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_any_text_content_round_trips(text: str) -> None:
    native = translate(request(user(text)))
    assert native["messages"] == [{"role": "user", "content": text}]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=5))
def test_text_parts_join_with_newlines(texts: list[str]) -> None:
    parts = [{"type": "text", "text": text} for text in texts]
    assert translate(request(user(parts)))["messages"][0]["content"] == "\n".join(texts)


tool_call_strategy = st.builds(
    lambda name, arguments, call_id: {
        "function": {"name": name, "arguments": arguments},
        **({"id": call_id} if call_id else {}),
    },
    st.text(min_size=1, max_size=8),
    st.dictionaries(
        st.text(max_size=5), st.integers(-1000, 1000) | st.text(max_size=5), max_size=3
    ),
    st.none() | st.text(alphabet="abc123", min_size=1, max_size=8),
)
native_piece = st.fixed_dictionaries(
    {},
    optional={
        "content": st.text(max_size=10),
        "thinking": st.text(max_size=10),
        "tool_calls": st.lists(tool_call_strategy, max_size=2),
    },
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(native_piece, max_size=6),
    st.sampled_from(["stop", "length", "load"]),
    st.booleans(),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)
def test_streamed_chunks_add_up_to_the_non_streamed_answer(
    pieces: list[dict[str, Any]],
    reason: str,
    include_usage: bool,
    prompt_tokens: int,
    eval_tokens: int,
) -> None:
    counts = {"prompt_eval_count": prompt_tokens, "eval_count": eval_tokens}
    lines = [line(**piece) for piece in pieces] + [done_line(reason, **counts)]
    translator, chunks = stream(lines, include_usage=include_usage)

    aggregated = {
        "content": "".join(piece.get("content", "") for piece in pieces),
        "thinking": "".join(piece.get("thinking", "") for piece in pieces),
        "tool_calls": [call for piece in pieces for call in piece.get("tool_calls", [])],
    }
    whole = ollama_chat_to_openai(
        native_response(aggregated, done_reason=reason, **counts),
        completion_id="chatcmpl-5",
        model="m",
        created=1,
    )
    assert_valid(RESPONSE, whole)
    message = whole["choices"][0]["message"]

    choices = [choice_of(chunk) for chunk in chunks if chunk["choices"]]
    deltas = [choice["delta"] for choice in choices]
    assert "".join(delta.get("content") or "" for delta in deltas) == (message["content"] or "")
    assert "".join(delta.get("reasoning_content", "") for delta in deltas) == message.get(
        "reasoning_content", ""
    )
    streamed_calls = [call for delta in deltas for call in delta.get("tool_calls", [])]
    assert [call["index"] for call in streamed_calls] == list(range(len(streamed_calls)))
    assert [c["function"] for c in streamed_calls] == [
        c["function"] for c in message.get("tool_calls", [])
    ]
    assert [("role" in delta) for delta in deltas] == [True] + [False] * (len(deltas) - 1)
    assert [choice["finish_reason"] for choice in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert translator.usage == whole["usage"]
    assert translator.text == aggregated["content"]
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-5"}
    assert {chunk["created"] for chunk in chunks} == {1719835200}
    if include_usage:
        assert chunks[-1] == {**chunks[-1], "choices": [], "usage": whole["usage"]}
        assert all(chunk["usage"] is None for chunk in chunks[:-1])


native_junk = st.dictionaries(
    st.sampled_from(
        ["message", "done", "done_reason", "logprobs", "eval_count", "prompt_eval_count"]
    ),
    json_values
    | st.fixed_dictionaries(
        {}, optional={"content": json_values, "thinking": json_values, "tool_calls": json_values}
    ),
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(st.lists(native_junk, max_size=4))
def test_malformed_native_lines_still_give_valid_chunks(lines: list[dict[str, Any]]) -> None:
    translator = ChatStreamTranslator("chatcmpl-1", "m", 1, include_usage=True)
    chunks = [chunk for native in [*lines, done_line()] for chunk in translator.feed(native)]
    assert_valid_sse(CHUNK, to_sse(chunks))
    for native in lines:
        assert_valid(
            RESPONSE, ollama_chat_to_openai(native, completion_id="c", model="m", created=1)
        )
