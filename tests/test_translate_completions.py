"""
Tests for :mod:`oproxy.translate.completions` (legacy ``/v1/completions``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oproxy.errors import InvalidRequest, UpstreamError
from oproxy.translate.common import SYSTEM_FINGERPRINT
from oproxy.translate.completions import (
    CompletionStreamTranslator,
    completion_prompts,
    completion_request_to_ollama,
    completion_response,
    completion_usage_chunk,
    echo_requested,
    ollama_generate_to_choice,
    requested_logprobs,
    single_prompt,
)
from tests.openai_schema import assert_valid, assert_valid_sse, to_sse

RESPONSE = "CreateCompletionResponse"
CHUNK = "CreateCompletionStreamResponse"
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def translate(body: dict[str, Any], prompt: str = "Hello") -> dict[str, Any]:
    return completion_request_to_ollama(body, model="upstream", prompt=prompt)


def rejected(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        completion_prompts(body)
    return info.value


# ==========================================================================
# Request


def test_prompt_string_and_list() -> None:
    assert completion_prompts({"prompt": "Once"}) == ["Once"]
    assert completion_prompts({"prompt": ""}) == [""]
    assert completion_prompts({"prompt": ["a", "b"]}) == ["a", "b"]


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3]], ["text", [4, 5]]])
def test_token_prompts_are_refused_with_an_explanation(prompt: Any) -> None:
    error = rejected({"prompt": prompt})
    assert (error.param, error.code) == ("prompt", "unsupported_value")
    assert "not supported" in error.message


@pytest.mark.parametrize(
    ("prompt", "param", "code"),
    [
        (None, "prompt", "missing_required_parameter"),
        ([], "prompt", "invalid_value"),
        (7, "prompt", "invalid_type"),
        ({"text": "x"}, "prompt", "invalid_type"),
        (["a", None], "prompt.1", "invalid_type"),
    ],
)
def test_bad_prompts_are_refused(prompt: Any, param: str, code: str) -> None:
    error = rejected({"prompt": prompt})
    assert (error.param, error.code) == (param, code)


def test_a_minimal_request() -> None:
    assert translate({"model": "m", "prompt": "Hello"}) == {
        "model": "upstream",
        "prompt": "Hello",
        "stream": False,
        "raw": False,
    }


def test_a_full_request() -> None:
    body = {
        "model": "m",
        "prompt": "def f(",
        "suffix": "    return x",
        "stream": True,
        "temperature": 0.8,
        "max_tokens": 32,
        "stop": ["\n\n"],
        "seed": 1,
        "logprobs": 2,
        "echo": True,
        "options": {"num_ctx": 4096, "keep_alive": "2m"},
    }
    assert translate(body, "def f(") == {
        "model": "upstream",
        "prompt": "def f(",
        "stream": True,
        "raw": False,
        "suffix": "    return x",
        "options": {
            "num_ctx": 4096,
            "temperature": 0.8,
            "seed": 1,
            "stop": ["\n\n"],
            "num_predict": 32,
        },
        "logprobs": True,
        "top_logprobs": 2,
        "keep_alive": "2m",
    }


def test_only_a_positive_logprobs_asks_for_logprobs() -> None:
    assert requested_logprobs({"logprobs": 3}) == 3
    assert requested_logprobs({"logprobs": 0}) is None
    assert requested_logprobs({"logprobs": None}) is None
    native = translate({"logprobs": 0})
    assert "logprobs" not in native
    assert "top_logprobs" not in native


def test_one_generation_takes_one_prompt() -> None:
    assert single_prompt({"prompt": "a"}) == single_prompt({"prompt": ["a"]}) == "a"
    with pytest.raises(InvalidRequest) as info:
        single_prompt({"prompt": ["a", "b"]})  # lists are split before they get here
    assert info.value.param == "prompt"


def test_n_and_best_of_are_checked_but_never_sent() -> None:
    assert translate({"n": 3, "best_of": 3}) == translate({})


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": "2"}, "n"),
        ({"best_of": 0}, "best_of"),
        ({"echo": "yes"}, "echo"),
        ({"suffix": 1}, "suffix"),
        ({"stop": [None]}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"think": "deep"}, "think"),
        ({"format": "yaml"}, "format"),
    ],
)
def test_bad_fields_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        translate(body)
    assert info.value.param == param


def test_native_format_and_think_pass_through() -> None:
    native = translate({"format": "json", "think": False})
    assert (native["format"], native["think"]) == ("json", False)


def test_echo_flag() -> None:
    assert echo_requested({"echo": True}) is True
    assert echo_requested({}) is False


# ==========================================================================
# Response


def native(response: str = "", **fields: Any) -> dict[str, Any]:
    return {"model": "m", "created_at": "2024-07-01T12:00:00Z", "response": response, **fields}


NATIVE_LOGPROBS = [
    {
        "token": " wor",
        "logprob": -0.5,
        "top_logprobs": [{"token": " wor", "logprob": -0.5}, {"token": " the", "logprob": -1.5}],
    },
    {"token": "ld", "logprob": -0.1, "top_logprobs": [{"token": "ld", "logprob": -0.1}]},
]


def test_a_choice_with_echo_and_logprobs() -> None:
    """Weak spot 15: Ollama's /v1 asks for logprobs and never returns them."""
    result = native(" world", done=True, done_reason="length", logprobs=NATIVE_LOGPROBS)
    choice = ollama_generate_to_choice(
        result, index=1, echo_prompt="Hello", logprobs_requested=True
    )
    assert choice == {
        "text": "Hello world",
        "index": 1,
        "logprobs": {
            "tokens": [" wor", "ld"],
            "token_logprobs": [-0.5, -0.1],
            "top_logprobs": [{" wor": -0.5, " the": -1.5}, {"ld": -0.1}],
            "text_offset": [5, 9],
        },
        "finish_reason": "length",
    }


def test_a_plain_choice_and_the_response_object() -> None:
    choice = ollama_generate_to_choice(
        native("Hi", done=True, done_reason="stop"),
        index=0,
        echo_prompt=None,
        logprobs_requested=False,
    )
    assert choice == {"text": "Hi", "index": 0, "logprobs": None, "finish_reason": "stop"}
    response = completion_response(
        [choice], completion_id="cmpl-x", model="m", created=9, usage=USAGE
    )
    assert response == {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 9,
        "model": "m",
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [choice],
        "usage": USAGE,
    }
    assert_valid(RESPONSE, response)


def test_an_upstream_error_raises() -> None:
    with pytest.raises(UpstreamError, match="boom"):
        ollama_generate_to_choice(
            {"error": "boom"}, index=0, echo_prompt=None, logprobs_requested=False
        )


def run_stream(
    lines: list[dict[str, Any]], *, echo: str | None = None, logprobs: bool = False
) -> tuple[CompletionStreamTranslator, list[dict[str, Any]]]:
    translator = CompletionStreamTranslator(
        "cmpl-1", "m", 7, index=0, echo_prompt=echo, logprobs_requested=logprobs
    )
    chunks = [chunk for line in lines for chunk in translator.feed(line)]
    return translator, chunks


def test_a_stream_with_echo_and_usage() -> None:
    lines = [
        native("Hel"),
        native(""),
        native("lo"),
        native("", done=True, done_reason="stop", prompt_eval_count=5, eval_count=3),
    ]
    translator, chunks = run_stream(lines, echo="Say: ")
    usage_chunk = completion_usage_chunk(
        completion_id="cmpl-1", model="m", created=7, usage=translator.usage or {}
    )
    envelope = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 7,
        "model": "m",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {**envelope, "choices": [choice]}

    assert chunks == [
        chunk("Say: ", None),
        chunk("Hel", None),
        chunk("lo", None),
        chunk("", "stop"),
    ]
    assert usage_chunk == {**envelope, "choices": [], "usage": USAGE}
    assert_valid_sse(CHUNK, to_sse([*chunks, usage_chunk]))
    assert translator.done
    assert translator.text == "Say: Hello"


def test_stream_chunks_carry_no_zero_usage() -> None:
    """Weak spot 15: Ollama's /v1 puts zero usage objects on every chunk."""
    _, chunks = run_stream([native("a"), native("", done=True)])
    assert all("usage" not in chunk for chunk in chunks)


def test_streamed_logprobs_offsets_continue_across_chunks() -> None:
    lines = [
        native(" wor", logprobs=NATIVE_LOGPROBS[:1]),
        native("ld", done=True, done_reason="stop", logprobs=NATIVE_LOGPROBS[1:]),
    ]
    _, chunks = run_stream(lines, echo="Hello", logprobs=True)
    offsets = [
        chunk["choices"][0]["logprobs"] and chunk["choices"][0]["logprobs"]["text_offset"]
        for chunk in chunks
    ]
    assert offsets == [None, [5], [9]]
    assert_valid_sse(CHUNK, to_sse(chunks))


def test_stream_error_line_raises_and_later_lines_are_ignored() -> None:
    translator, _ = run_stream([native("x")])
    with pytest.raises(UpstreamError):
        translator.feed({"error": "runner crashed"})
    translator.feed(native("", done=True))
    assert translator.feed(native("late")) == []


# ==========================================================================
# Properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = [
    "prompt",
    "suffix",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "best_of",
    "stream",
    "stop",
    "echo",
    "logprobs",
    "seed",
    "options",
    "keep_alive",
    "format",
    "think",
    "user",
]
BASE = {"model": "m", "prompt": ["a", "b"], "echo": True, "logprobs": 1}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIELDS), json_values)
def test_any_json_value_in_any_field_translates_or_is_refused(field: str, value: Any) -> None:
    body = copy.deepcopy(BASE)
    body[field] = value
    with contextlib.suppress(InvalidRequest):
        for prompt in completion_prompts(body):
            orjson.dumps(translate(body, prompt))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.text(max_size=8), max_size=6),
    st.none() | st.text(max_size=8),
    st.sampled_from(["stop", "length"]),
    st.booleans(),
)
def test_streamed_text_equals_the_non_streamed_choice(
    pieces: list[str], echo: str | None, reason: str, logprobs: bool
) -> None:
    def logprob_entries(text: str) -> list[dict[str, Any]]:
        return [{"token": text, "logprob": -1.0, "top_logprobs": []}] if text else []

    lines = [native(piece, logprobs=logprob_entries(piece)) for piece in pieces]
    lines.append(native("", done=True, done_reason=reason, eval_count=len(pieces)))
    translator, chunks = run_stream(lines, echo=echo, logprobs=logprobs)
    assert_valid_sse(CHUNK, to_sse(chunks))

    whole = native(
        "".join(pieces),
        done=True,
        done_reason=reason,
        logprobs=[e for p in pieces for e in logprob_entries(p)],
    )
    choice = ollama_generate_to_choice(
        whole, index=0, echo_prompt=echo, logprobs_requested=logprobs
    )
    choices = [chunk["choices"][0] for chunk in chunks]
    assert "".join(c["text"] for c in choices) == choice["text"] == translator.text
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + [reason]
    if logprobs:
        streamed_offsets = [
            o for c in choices if c["logprobs"] for o in c["logprobs"]["text_offset"]
        ]
        assert streamed_offsets == choice["logprobs"]["text_offset"]
    assert_valid(
        RESPONSE,
        completion_response([choice], completion_id="c", model="m", created=1, usage=USAGE),
    )
