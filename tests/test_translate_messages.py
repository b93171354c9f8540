"""
Anthropic's Messages API ⇄ chat completions: the request's blocks and
fields, the message object and the stream events, each parsed into the
official ``anthropic`` SDK's types; property tests over conversations and
chunk streams.
"""

from __future__ import annotations

from typing import Any

import anthropic.types
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oproxy.errors import InvalidRequest
from oproxy.translate.chat import chat_request_to_ollama
from oproxy.translate.messages import (
    MessageStream,
    chat_for_backend,
    chat_request,
    message_from_chat,
    reasoning_effort,
    stop_reason,
)

EVENTS = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def request(**fields: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hello"}],
        **fields,
    }


def refused(body: dict[str, Any], param: str, **options: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        chat_request(body, **options)
    assert caught.value.param == param, caught.value
    return caught.value


# -- the request ------------------------------------------------------------------------


def test_a_simple_request() -> None:
    assert chat_request(request(system="Be brief.")) == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
        "max_completion_tokens": 100,
    }


def test_a_tool_round_trip_conversation() -> None:
    chat = chat_request(
        request(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Oslo"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Here:", "cache_control": {"type": "ephemeral"}},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [
                                {"type": "text", "text": "rain"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/png",
                                        "data": "AAAA",
                                    },
                                },
                            ],
                            "is_error": False,
                        },
                    ],
                },
            ],
            tools=[WEATHER],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        )
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Here:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False


def test_image_by_url() -> None:
    chat = chat_request(
        request(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                        {"type": "text", "text": "What is it?"},
                    ],
                }
            ]
        )
    )
    assert chat["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
        {"type": "text", "text": "What is it?"},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_tool_choices(choice: Any, expected: Any) -> None:
    assert chat_request(request(tools=[WEATHER], tool_choice=choice))["tool_choice"] == expected


def test_sampling_stop_and_stream() -> None:
    chat = chat_request(
        request(
            temperature=0.5,
            top_p=0.8,
            top_k=40,
            stop_sequences=["END", ""],
            stream=True,
            thinking={"type": "enabled", "budget_tokens": 4000},
            metadata={"user_id": "u"},
        )
    )
    assert {k: chat[k] for k in ("temperature", "top_p", "top_k", "stop", "reasoning_effort")} == {
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 40,
        "stop": ["END"],
        "reasoning_effort": "low",
    }
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_top_k_and_stops_go_under_options_for_ollama() -> None:
    stops = ["a", "b", "c", "d", "e"]
    chat = chat_request(request(top_k=20, stop_sequences=stops, options={"num_ctx": 4096}))
    assert chat_for_backend(chat, runtime_options=False) is chat
    for_ollama = chat_for_backend(chat, runtime_options=True)
    assert "top_k" not in for_ollama and "stop" not in for_ollama
    native = chat_request_to_ollama(for_ollama, model="m")
    assert native["options"] == {"num_ctx": 4096, "top_k": 20, "stop": stops, "num_predict": 100}


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 10000}, "medium"),
        ({"type": "enabled", "budget_tokens": 31999}, "high"),
        ({"type": "disabled"}, "none"),
        ({"type": "adaptive"}, None),
    ],
)
def test_thinking_budgets_become_efforts(thinking: Any, effort: str | None) -> None:
    assert reasoning_effort({"thinking": thinking}) == effort


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            "messages.0.content.0.source.type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/tiff",
                                    "data": "AA",
                                },
                            }
                        ],
                    }
                ]
            },
            "messages.0.content.0.source.media_type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "messages.0.content.0.tool_use_id",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t"}]}]},
            "messages.0.content.0.name",
        ),
        ({"system": [{"type": "image"}]}, "system.0.type"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "maybe"}}, "thinking.type"),
    ],
)
def test_bad_fields_are_refused(fields: dict[str, Any], param: str) -> None:
    body = request(**fields)
    for name, value in fields.items():
        if value is None:
            del body[name]
    refused(body, param)


def test_count_tokens_needs_no_max_tokens() -> None:
    body = request()
    del body["max_tokens"]
    assert "max_completion_tokens" not in chat_request(body, counting=True)


TEXT = st.text(min_size=1, max_size=30)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Alternating turns, with tool calls answered in the next user turn."""
    turns: list[dict[str, Any]] = []
    for number in range(draw(st.integers(0, 3))):
        turns.append({"role": "user", "content": draw(TEXT)})
        if draw(st.booleans()):
            call_id = f"toolu_{number}"
            turns.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": draw(TEXT)},
                        {"type": "tool_use", "id": call_id, "name": "f", "input": {"n": number}},
                    ],
                }
            )
            turns.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": call_id, "content": draw(TEXT)}
                    ],
                }
            )
        turns.append({"role": "assistant", "content": draw(TEXT)})
    turns.append({"role": "user", "content": draw(TEXT)})
    return turns


@given(conversations())
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_every_conversation_is_a_chat_the_ollama_translation_takes(turns: list[Any]) -> None:
    chat = chat_request(request(messages=turns))
    native = chat_request_to_ollama(chat_for_backend(chat, True), model="m")
    texts: list[str] = []
    for turn in turns:
        content = turn["content"]
        if isinstance(content, str):
            texts.append(content)
            continue
        for block in content:
            if block["type"] == "text":
                texts.append(block["text"])
            elif block["type"] == "tool_result":
                texts.append(block["content"])
    assert [m["content"] for m in native["messages"]] == texts
    tool_messages = [m for m in native["messages"] if m["role"] == "tool"]
    assert all(m["tool_name"] == "f" for m in tool_messages)


# -- the message ---------------------------------------------------------------------------


def completion(
    message: dict[str, Any], finish_reason: str = "stop", **choice: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "llama3.2",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, **choice}],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 5,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }


def message(chat: dict[str, Any], stops: tuple[str, ...] = ()) -> dict[str, Any]:
    made = message_from_chat(chat, message_id="msg_1", model="llama3.2", stop_sequences=stops)
    anthropic.types.Message.model_validate(made)
    return made


def test_a_text_message() -> None:
    made = message(completion({"role": "assistant", "content": "Hello!"}))
    assert made["content"] == [{"type": "text", "text": "Hello!"}]
    assert made["stop_reason"] == "end_turn" and made["stop_sequence"] is None
    assert made["usage"] == {
        "input_tokens": 5,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }


def test_thinking_text_and_tool_use() -> None:
    made = message(
        completion(
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning_content": "Use the tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "f", "arguments": "not json"},
                    },
                ],
            },
            "tool_calls",
        )
    )
    assert made["content"] == [
        {"type": "thinking", "thinking": "Use the tool.", "signature": ""},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "f", "input": {}},
    ]
    assert made["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"finish_reason": "stop"}, ("end_turn", None)),
        ({"finish_reason": "length"}, ("max_tokens", None)),
        ({"finish_reason": "tool_calls"}, ("tool_use", None)),
        ({"finish_reason": "content_filter"}, ("refusal", None)),
        ({"finish_reason": "stop", "stop_reason": "END"}, ("stop_sequence", "END")),
        ({"finish_reason": "stop", "stop_reason": 128009}, ("end_turn", None)),
        ({"finish_reason": "stop", "stop_reason": "OTHER"}, ("end_turn", None)),
    ],
)
def test_stop_reasons(choice: dict[str, Any], expected: tuple[str, str | None]) -> None:
    assert stop_reason(choice, ["END"]) == expected
    made = message(completion({"role": "assistant", "content": "x"}, **choice), ("END",))
    assert (made["stop_reason"], made["stop_sequence"]) == expected


# -- the stream ----------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish_reason: str | None = None, **choice: Any) -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, **choice}],
    }


USAGE_CHUNK = {
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def run(chunks: list[dict[str, Any]], stops: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    stream = MessageStream("msg_1", "llama3.2", stops)
    events: list[dict[str, Any]] = []
    for each in chunks:
        events += stream.feed(each)
    events += stream.finish()
    for event in events:
        if event["type"] != "ping":
            EVENTS.validate_python(event)
    return events


def test_a_streamed_message_with_every_kind_of_block() -> None:
    events = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"reasoning_content": "Hmm."}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "function": {"name": "get_weather", "arguments": '{"ci'},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
            chunk({}, "tool_calls"),
            USAGE_CHUNK,
        ]
    )
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[3]["delta"] == {"type": "thinking_delta", "thinking": "Hmm."}
    assert events[6]["delta"] == {"type": "text_delta", "text": "Hel"}
    assert events[9]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {},
    }
    assert events[11]["delta"] == {"type": "input_json_delta", "partial_json": 'ty": "Oslo"}'}
    assert events[13]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[13]["usage"]["output_tokens"] == 4


def test_a_stream_stopped_by_a_named_stop_sequence() -> None:
    events = run(
        [chunk({"content": "x"}), chunk({}, "stop", stop_reason="END"), USAGE_CHUNK], ("END",)
    )
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


PIECES = st.lists(
    st.one_of(
        st.tuples(st.just("thinking"), TEXT),
        st.tuples(st.just("text"), TEXT),
        st.tuples(st.just("call"), st.lists(TEXT, min_size=1, max_size=3)),
    ),
    max_size=8,
)


@given(PIECES, st.sampled_from(["stop", "length", "tool_calls"]))
@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
def test_any_stream_gives_well_formed_events(pieces: list[Any], finish: str) -> None:
    """
    Every block is started, fed and stopped once, in index order, one at a
    time, and the deltas add up to what the chunks brought.
    """
    chunks: list[dict[str, Any]] = []
    expected: list[tuple[str, str]] = []
    calls = 0
    for kind, value in pieces:
        if kind == "call":
            first, *rest = value
            fn = {"name": "f", "arguments": first}
            chunks.append(
                chunk({"tool_calls": [{"index": calls, "id": f"c{calls}", "function": fn}]})
            )
            chunks += [
                chunk({"tool_calls": [{"index": calls, "function": {"arguments": part}}]})
                for part in rest
            ]
            calls += 1
            expected.append(("tool_use", "".join(value)))
        else:
            chunks.append(chunk({"reasoning_content" if kind == "thinking" else "content": value}))
            if expected and expected[-1][0] == kind:
                expected[-1] = (kind, expected[-1][1] + value)
            else:
                expected.append((kind, value))
    events = run([*chunks, chunk({}, finish), USAGE_CHUNK])
    blocks: list[tuple[str, str]] = []
    open_index: int | None = None
    for event in events:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == len(blocks)
            open_index = event["index"]
            blocks.append((event["content_block"]["type"], ""))
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index
            delta = event["delta"]
            piece = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
            kind, so_far = blocks[open_index]
            blocks[open_index] = (kind, so_far + piece)
        elif event["type"] == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
    assert open_index is None
    assert blocks == expected
    reasons = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
    assert events[-2]["delta"]["stop_reason"] == reasons[finish]
    assert events[-1] == {"type": "message_stop"}
