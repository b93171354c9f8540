"""
Tests for :mod:`oproxy.translate.embeddings`.
"""

from __future__ import annotations

import array
import base64
import contextlib
import copy
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oproxy.errors import InvalidRequest, UpstreamError
from oproxy.translate.embeddings import (
    MAX_INPUTS,
    embedding_inputs,
    embeddings_request_to_ollama,
    encoding_format,
    ollama_embed_to_openai,
)
from tests.openai_schema import assert_valid


def refused(function: Any, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        function(body)
    return info.value


# ==========================================================================
# Request


def test_inputs() -> None:
    assert embedding_inputs({"input": "Hello"}) == ["Hello"]
    assert embedding_inputs({"input": ""}) == [""]
    assert embedding_inputs({"input": ["a", "", "b"]}) == ["a", "", "b"]
    assert len(embedding_inputs({"input": ["x"] * MAX_INPUTS})) == MAX_INPUTS


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3, 4]], ["a", [1]]])
def test_token_inputs_are_refused_with_an_explanation(tokens: Any) -> None:
    """Weak spot 11: refused still, but saying why and what to do."""
    error = refused(embedding_inputs, {"input": tokens})
    assert (error.param, error.code) == ("input", "unsupported_value")
    assert "check_embedding_ctx_length=False" in error.message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "input", "missing_required_parameter"),
        ({"input": None}, "input", "missing_required_parameter"),
        ({"input": []}, "input", "invalid_value"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "input", "invalid_value"),
        ({"input": 3}, "input", "invalid_type"),
        ({"input": ["a", {"text": "b"}]}, "input.1", "invalid_type"),
        ({"input": ["a", True]}, "input.1", "invalid_type"),
    ],
)
def test_bad_inputs_are_refused(body: dict[str, Any], param: str, code: str) -> None:
    error = refused(embedding_inputs, body)
    assert (error.param, error.code) == (param, code)


def test_encoding_format() -> None:
    assert encoding_format({}) == "float"
    assert encoding_format({"encoding_format": None}) == "float"
    assert encoding_format({"encoding_format": "base64"}) == "base64"
    assert encoding_format({"encoding_format": "FLOAT"}) == "float"
    error = refused(encoding_format, {"encoding_format": "json"})
    assert (error.param, error.code) == ("encoding_format", "invalid_value")
    assert (
        error.message
        == "Invalid value for 'encoding_format' = json. Supported values: ['float', 'base64']."
    )
    assert refused(encoding_format, {"encoding_format": 1}).param == "encoding_format"


def test_native_request() -> None:
    assert embeddings_request_to_ollama({"input": "x"}, model="nomic", inputs=["x"]) == {
        "model": "nomic",
        "input": ["x"],
    }
    body = {"dimensions": 256, "truncate": False, "keep_alive": "1m", "options": {"num_ctx": 512}}
    assert embeddings_request_to_ollama(body, model="nomic", inputs=["a", "b"]) == {
        "model": "nomic",
        "input": ["a", "b"],
        "dimensions": 256,
        "truncate": False,
        "options": {"num_ctx": 512},
        "keep_alive": "1m",
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": "256"}, "dimensions"),
        ({"dimensions": True}, "dimensions"),
        ({"truncate": "no"}, "truncate"),
        ({"options": []}, "options"),
        ({"keep_alive": "forever"}, "keep_alive"),
    ],
)
def test_bad_request_fields_are_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        embeddings_request_to_ollama(body, model="m", inputs=["x"])
    assert info.value.param == param


# ==========================================================================
# Response


NATIVE = {"model": "nomic", "embeddings": [[0.1, -0.2, 0.3], [0.1, 0.2]], "prompt_eval_count": 8}


def test_float_response() -> None:
    result = ollama_embed_to_openai(NATIVE, model="client-name", encoding_format="float")
    assert result == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]},
            {"object": "embedding", "index": 1, "embedding": [0.1, 0.2]},
        ],
        "model": "client-name",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert_valid("CreateEmbeddingResponse", result)


def test_base64_is_little_endian_float32() -> None:
    result = ollama_embed_to_openai(NATIVE, model="m", encoding_format="base64")
    assert [item["embedding"] for item in result["data"]] == ["zczMPc3MTL6amZk+", "zczMPc3MTD4="]
    assert_valid("CreateEmbeddingResponseBase64", result)


@pytest.mark.parametrize(
    "native",
    [
        {"error": 'model "x" not found, try pulling it first'},
        {"model": "m"},
        {"model": "m", "embeddings": []},
        {"model": "m", "embeddings": None},
        {"model": "m", "embeddings": [[0.1, "x"]]},
        {"model": "m", "embeddings": [[True]]},
        {"model": "m", "embeddings": [0.1, 0.2]},
    ],
)
def test_malformed_upstream_responses_raise_upstream_error(native: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError):
        ollama_embed_to_openai(native, model="m", encoding_format="float")


def test_a_value_beyond_float32_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError):
        ollama_embed_to_openai({"embeddings": [[1e39]]}, model="m", encoding_format="base64")


def test_missing_count_gives_zero_usage() -> None:
    result = ollama_embed_to_openai({"embeddings": [[0.5]]}, model="m", encoding_format="float")
    assert result["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


# ==========================================================================
# Properties

float32s = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(float32s, min_size=1, max_size=64), min_size=1, max_size=4))
def test_base64_embeddings_decode_back_to_the_float32_values(vectors: list[list[float]]) -> None:
    result = ollama_embed_to_openai({"embeddings": vectors}, model="m", encoding_format="base64")
    for item, vector in zip(result["data"], vectors, strict=True):
        raw = base64.b64decode(item["embedding"], validate=True)
        assert list(struct.unpack(f"<{len(vector)}f", raw)) == vector
        decoded = array.array("f", raw)  # what the SDK does (on a little-endian host)
        assert decoded.tolist() == vector
    assert_valid("CreateEmbeddingResponseBase64", result)


@settings(max_examples=50, deadline=None)
@given(st.text() | st.lists(st.text(), min_size=1, max_size=20))
def test_any_text_input_is_accepted_in_order(value: str | list[str]) -> None:
    expected = [value] if isinstance(value, str) else value
    assert embedding_inputs({"input": value}) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(
        ["input", "encoding_format", "dimensions", "truncate", "keep_alive", "options", "user"]
    ),
    json_values,
)
def test_any_json_value_in_any_field_translates_or_is_refused(field: str, value: Any) -> None:
    body = copy.deepcopy({"model": "m", "input": ["a"], "encoding_format": "base64"})
    body[field] = value
    with contextlib.suppress(InvalidRequest):
        inputs = embedding_inputs(body)
        encoding_format(body)
        orjson.dumps(embeddings_request_to_ollama(body, model="m", inputs=inputs))
