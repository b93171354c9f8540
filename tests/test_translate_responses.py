"""
OpenAI's Responses API ⇄ chat completions: the request's items and fields,
the response object and the typed stream, each checked against OpenAI's
published schema; property tests over conversations and chunk streams.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oproxy.errors import InvalidRequest, RateLimited, UpstreamError
from oproxy.translate.chat import chat_request_to_ollama
from oproxy.translate.responses import (
    ResponseStream,
    chat_messages,
    chat_request,
    input_items,
    response_error,
    response_from_chat,
    response_template,
    usage_of,
)
from tests.openai_schema import assert_valid

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "strict": True,
}


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "llama3.2", "input": "Hello", **fields}


def chat_of(**fields: Any) -> dict[str, Any]:
    body = request(**fields)
    return chat_request(body, [], input_items(body))


def refused(body: dict[str, Any], param: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        chat_request(body, [], input_items(body))
    assert caught.value.param == param, caught.value
    return caught.value


# -- input items --------------------------------------------------------------------


def test_a_string_is_one_user_message() -> None:
    (item,) = input_items(request(input="Why is the sky blue?"))
    assert item["type"] == "message" and item["role"] == "user"
    assert item["content"] == [{"type": "input_text", "text": "Why is the sky blue?"}]
    assert item["id"].startswith("msg_") and item["status"] == "completed"
    assert_valid("ItemResource", item)


def test_items_are_normalised_with_ids_kept_or_made() -> None:
    items = input_items(
        request(
            input=[
                {"role": "developer", "content": "Be brief."},
                {
                    "type": "message",
                    "id": "msg_mine",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "https://example.com/a.png"},
                    ],
                },
                {"role": "assistant", "content": "A cat."},
                {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "42"},
                {"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
            ]
        )
    )
    assert [item["type"] for item in items] == [
        "message",
        "message",
        "message",
        "function_call",
        "function_call_output",
        "reasoning",
    ]
    assert items[1]["id"] == "msg_mine"
    assert items[1]["content"][1] == {
        "type": "input_image",
        "image_url": "https://example.com/a.png",
        "detail": "auto",
    }
    assert items[2]["content"] == [
        {"type": "output_text", "text": "A cat.", "annotations": [], "logprobs": []}
    ]
    assert len({item["id"] for item in items}) == len(items)
    for item in items:
        assert_valid("ItemResource", item)


@pytest.mark.parametrize(
    ("input_", "param"),
    [
        (None, "input"),
        (42, "input"),
        ([{"content": "no role"}], "input.0.role"),
        ([{"role": "tool", "content": "x"}], "input.0.role"),
        ([{"role": "user"}], "input.0.content"),
        (
            [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
            "input.0.content.0.type",
        ),
        (
            [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}],
            "input.0.content.0.file_id",
        ),
        ([{"role": "user", "content": [{"type": "input_image"}]}], "input.0.content.0.image_url"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "input.0.content.0.type"),
        ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input.0.call_id"),
        ([{"type": "function_call_output", "call_id": "c"}], "input.0.output"),
        ([{"type": "item_reference", "id": "msg_1"}], "input.0.type"),
        ([{"type": "web_search_call", "id": "ws_1"}], "input.0.type"),
    ],
)
def test_bad_input_is_refused_naming_the_field(input_: Any, param: str) -> None:
    body = request(input=input_)
    if input_ is None:
        del body["input"]
    with pytest.raises(InvalidRequest) as caught:
        input_items(body)
    assert caught.value.param == param
    assert caught.value.status == 400


# -- items as chat messages -----------------------------------------------------------


def test_a_conversation_becomes_chat_messages() -> None:
    items = input_items(
        request(
            input=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "Two cities."}],
                },
                {"role": "assistant", "content": "Let me look."},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"c":"P"}'},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"c":"R"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "sun"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "rain"}],
                },
                {"type": "function_call", "call_id": "c3", "name": "w", "arguments": "{}"},
            ]
        )
    )
    assert chat_messages("You are kind.", items) == [
        {"role": "system", "content": "You are kind."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "reasoning_content": "Two cities.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"c":"P"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"c":"R"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sun"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c3", "type": "function", "function": {"name": "w", "arguments": "{}"}}
            ],
        },
    ]


def test_images_become_image_url_parts() -> None:
    items = input_items(
        request(
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is it?"},
                        {
                            "type": "input_image",
                            "image_url": "data:image/png;base64,AAAA",
                            "detail": "low",
                        },
                    ],
                }
            ]
        )
    )
    assert chat_messages(None, items) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is it?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                },
            ],
        }
    ]


# -- the rest of the request ------------------------------------------------------------


def test_fields_map_to_the_chat_request() -> None:
    chat = chat_of(
        instructions="Answer in French.",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        text={
            "format": {
                "type": "json_schema",
                "name": "answer",
                "schema": {"type": "object"},
                "strict": True,
            }
        },
        reasoning={"effort": "low", "summary": "auto"},
        max_output_tokens=64,
        temperature=0.2,
        top_p=0.9,
        stream=True,
        options={"num_ctx": 8192},
        keep_alive="5m",
        metadata={"who": "test"},
        store=False,
    )
    assert chat == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": WEATHER["parameters"],
                    "strict": True,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
        },
        "reasoning_effort": "low",
        "max_completion_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "options": {"num_ctx": 8192},
        "keep_alive": "5m",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # The whole of it is a chat request the Ollama translation takes.
    native = chat_request_to_ollama(chat, model="llama3.2")
    assert native["think"] == "low" and native["format"] == {"type": "object"}
    assert native["options"] == {
        "num_ctx": 8192,
        "temperature": 0.2,
        "top_p": 0.9,
        "num_predict": 64,
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        (
            {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "get_weather"}],
            },
            {
                "type": "allowed_tools",
                "allowed_tools": {
                    "mode": "required",
                    "tools": [{"type": "function", "function": {"name": "get_weather"}}],
                },
            },
        ),
    ],
)
def test_tool_choices(choice: Any, expected: Any) -> None:
    assert chat_of(tools=[WEATHER], tool_choice=choice)["tool_choice"] == expected


def test_json_object_and_text_formats() -> None:
    assert chat_of(text={"format": {"type": "json_object"}})["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in chat_of(text={"format": {"type": "text"}})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"type": "function"}]}, "tools.0.name"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": "high"}, "top_p"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"instructions": ["not", "a", "string"]}, "instructions"),
        ({"stream": "yes"}, "stream"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ],
)
def test_bad_fields_are_refused(fields: dict[str, Any], param: str) -> None:
    refused(request(**fields), param)


def test_background_false_is_fine() -> None:
    assert chat_of(background=False)["messages"] == [{"role": "user", "content": "Hello"}]


def test_history_comes_before_the_new_input_and_instructions_first() -> None:
    earlier = input_items(request(input="My name is Ada."))
    answer = [
        {
            "type": "message",
            "id": "msg_a",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Hi Ada.", "annotations": [], "logprobs": []}
            ],
        }
    ]
    body = request(input="What is my name?", instructions="Be short.")
    chat = chat_request(body, [*earlier, *answer], input_items(body))
    assert chat["messages"] == [
        {"role": "system", "content": "Be short."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hi Ada."},
        {"role": "user", "content": "What is my name?"},
    ]


TEXT = st.text(min_size=1, max_size=30)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Plausible input item lists: messages, calls answered by outputs."""
    items: list[dict[str, Any]] = []
    for number in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["user", "assistant", "call", "system"]))
        if kind == "call":
            call_id = f"call_{number}"
            items.append(
                {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}"}
            )
            items.append({"type": "function_call_output", "call_id": call_id, "output": draw(TEXT)})
        else:
            items.append({"role": kind, "content": draw(TEXT)})
    return items


@given(conversations())
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_every_conversation_is_a_chat_the_ollama_translation_takes(items: list[Any]) -> None:
    body = request(input=items)
    chat = chat_request(body, [], input_items(body))
    native = chat_request_to_ollama(chat, model="m")
    texts = [
        item.get("content") or item.get("output")
        for item in items
        if item.get("type") != "function_call"
    ]
    assert [m["content"] for m in native["messages"] if m["content"]] == texts
    calls = [m for m in native["messages"] if m.get("tool_calls")]
    assert sum(len(m["tool_calls"]) for m in calls) == sum(
        item.get("type") == "function_call" for item in items
    )


# -- the response object --------------------------------------------------------------


def completion(
    message: dict[str, Any], finish_reason: str = "stop", **usage: int
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "llama3.2",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12, **usage},
    }


def template(**fields: Any) -> dict[str, Any]:
    return response_template(
        request(**fields), response_id="resp_1", created_at=1_700_000_000, store=True
    )


def test_a_text_answer() -> None:
    response = response_from_chat(
        template(instructions="Be kind.", metadata={"a": "b"}, user="u1"),
        completion({"role": "assistant", "content": "Hello!"}),
        completed_at=1_700_000_001,
    )
    assert_valid("Response", response)
    assert response["status"] == "completed" and response["completed_at"] == 1_700_000_001
    assert response["instructions"] == "Be kind." and response["metadata"] == {"a": "b"}
    (message,) = response["output"]
    assert message["content"][0]["text"] == "Hello!"
    assert response["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12,
    }


def test_reasoning_text_and_calls_in_order() -> None:
    response = response_from_chat(
        template(tools=[WEATHER]),
        completion(
            {
                "role": "assistant",
                "content": "Looking.",
                "reasoning_content": "Need weather.",
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            "tool_calls",
        ),
        completed_at=2,
    )
    assert_valid("Response", response)
    assert [item["type"] for item in response["output"]] == [
        "reasoning",
        "message",
        "function_call",
    ]
    assert response["output"][0]["content"] == [{"type": "reasoning_text", "text": "Need weather."}]
    call = response["output"][2]
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_9",
        "get_weather",
        '{"city":"Oslo"}',
    )
    assert response["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER["parameters"],
            "strict": True,
        }
    ]


def test_a_cut_answer_is_incomplete() -> None:
    response = response_from_chat(
        template(max_output_tokens=5),
        completion({"role": "assistant", "content": "One two"}, "length"),
        completed_at=2,
    )
    assert_valid("Response", response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def test_usage_details_are_carried() -> None:
    assert usage_of(
        {
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 6},
            "completion_tokens_details": {"reasoning_tokens": 3},
        }
    ) == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 14,
    }
    assert usage_of(None) is None


# -- the stream ------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "llama3.2",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


USAGE_CHUNK = {
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def run(chunks: list[dict[str, Any]], **fields: Any) -> tuple[ResponseStream, list[Any]]:
    stream = ResponseStream(template(**fields), lambda: 1_700_000_009)
    events: list[Any] = []
    for each in chunks:
        events += stream.feed(each)
    events += stream.finish()
    return stream, events


def test_a_streamed_answer_with_every_kind_of_item() -> None:
    stream, events = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"reasoning_content": "Think"}),
            chunk({"reasoning_content": "ing."}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"ci'},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{}"},
                        }
                    ]
                }
            ),
            chunk({}, "tool_calls"),
            USAGE_CHUNK,
        ],
        tools=[WEATHER],
    )
    for event in events:
        assert_valid("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]["response"]
    assert final is stream.response and final["status"] == "completed"
    assert final["completed_at"] == 1_700_000_009
    assert [item["type"] for item in final["output"]] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert final["output"][1]["content"][0]["text"] == "Hello"
    assert final["output"][2]["arguments"] == '{"city":"Oslo"}'
    assert final["usage"]["total_tokens"] == 7
    assert all(item["status"] == "completed" for item in final["output"])


def test_a_streamed_answer_cut_short_is_incomplete() -> None:
    _, events = run([chunk({"content": "One"}), chunk({}, "length"), USAGE_CHUNK])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    for event in events:
        assert_valid("ResponseStreamEvent", event)


def test_a_failing_stream_ends_with_error_and_response_failed() -> None:
    stream = ResponseStream(template(), lambda: 2)
    events = stream.feed(chunk({"content": "Half"}))
    failure = stream.failure(UpstreamError("the model crashed"))
    assert [e["type"] for e in failure] == ["error", "response.failed"]
    assert failure[0]["message"] == "the model crashed"
    assert failure[1]["response"]["error"] == {
        "code": "server_error",
        "message": "the model crashed",
    }
    assert [e["sequence_number"] for e in events + failure] == list(range(len(events) + 2))
    for event in failure:
        assert_valid("ResponseStreamEvent", event)
    # Before anything was announced: only the error.
    assert [
        e["type"] for e in ResponseStream(template(), lambda: 2).failure(UpstreamError("x"))
    ] == ["error"]


def test_response_error_codes_are_openais() -> None:
    assert response_error(RateLimited("slow down"))["code"] == "rate_limit_exceeded"
    assert response_error(InvalidRequest("bad", code="invalid_image_format"))["code"] == (
        "invalid_image_format"
    )
    assert response_error(InvalidRequest("bad", code="something_else"))["code"] == "server_error"


PIECES = st.lists(
    st.one_of(
        st.tuples(st.just("reasoning"), TEXT),
        st.tuples(st.just("text"), TEXT),
        st.tuples(st.just("call"), st.lists(TEXT, min_size=1, max_size=3)),
    ),
    max_size=8,
)


@given(PIECES, st.sampled_from(["stop", "length", "tool_calls"]))
@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
def test_any_stream_gives_well_formed_events(pieces: list[Any], finish: str) -> None:
    """
    Whatever the chunks bring: sequence numbers count from 0, every delta
    belongs to an item added and not yet done, every item added is done
    once, and the deltas add up to the finished response's output.
    """
    chunks: list[dict[str, Any]] = []
    calls = 0
    for kind, value in pieces:
        if kind == "reasoning":
            chunks.append(chunk({"reasoning_content": value}))
        elif kind == "text":
            chunks.append(chunk({"content": value}))
        else:
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
    chunks += [chunk({}, finish), USAGE_CHUNK]
    stream, events = run(chunks)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    open_items: dict[str, dict[str, Any]] = {}
    done: dict[int, dict[str, Any]] = {}
    streamed: dict[str, str] = {}
    for event in events:
        kind = event["type"]
        if kind == "response.output_item.added":
            open_items[event["item"]["id"]] = event["item"]
            assert event["output_index"] not in done
        elif kind.endswith(".delta"):
            assert event["item_id"] in open_items
            streamed[event["item_id"]] = streamed.get(event["item_id"], "") + event["delta"]
        elif kind == "response.output_item.done":
            item = event["item"]
            assert open_items.pop(item["id"])
            done[event["output_index"]] = item
    assert not open_items
    output = stream.response["output"]
    assert [done[index] for index in sorted(done)] == output
    for item in output:
        whole = item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"]
        assert streamed.get(item["id"], "") == whole or (
            item["type"] == "function_call" and whole == "{}"
        )
    expected = "response.incomplete" if finish == "length" else "response.completed"
    assert events[-1]["type"] == expected
