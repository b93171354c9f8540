"""
Tests for :mod:`oproxy.translate.models`.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oproxy.errors import UpstreamError
from oproxy.translate.models import model_from_tag, ollama_show_to_model, ollama_tags_to_models
from tests.openai_schema import assert_valid

TAGS = {
    "models": [
        {
            "name": "llama3.2:latest",
            "model": "llama3.2:latest",
            "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {"family": "llama"},
        },
        {"name": "hf.co/org/repo:Q4_K_M", "modified_at": "2024-07-01T12:00:00Z"},
    ]
}


def test_tags_become_a_model_list_in_order() -> None:
    result = ollama_tags_to_models(TAGS, owned_by="gpu-box")
    assert result == {
        "object": "list",
        "data": [
            {
                "id": "llama3.2:latest",
                "object": "model",
                "created": 1746405464,
                "owned_by": "gpu-box",
            },
            {
                "id": "hf.co/org/repo:Q4_K_M",
                "object": "model",
                "created": 1719835200,
                "owned_by": "gpu-box",
            },
        ],
    }
    assert_valid("ListModelsResponse", result)


@pytest.mark.parametrize("tags", [{"models": []}, {"models": None}, {}])
def test_no_models_is_an_empty_list_not_null(tags: dict[str, Any]) -> None:
    """Weak spot 8: Ollama's /v1 sends "data": null."""
    result = ollama_tags_to_models(tags, owned_by="b")
    assert result == {"object": "list", "data": []}
    assert_valid("ListModelsResponse", result)


def test_entries_without_an_id_are_skipped() -> None:
    tags = {"models": [{"size": 1}, "junk", {"model": "", "name": "x:latest"}]}
    assert [model["id"] for model in ollama_tags_to_models(tags, owned_by="b")["data"]] == [
        "x:latest"
    ]


def test_model_from_tag_without_a_date_has_created_zero() -> None:
    assert model_from_tag({"model": "m:1"}, owned_by="b") == {
        "id": "m:1",
        "object": "model",
        "created": 0,
        "owned_by": "b",
    }
    with pytest.raises(UpstreamError, match="neither"):
        model_from_tag({}, owned_by="b")


def test_show_becomes_a_model_with_the_requested_id() -> None:
    show = {"modelfile": "...", "model_info": {}, "modified_at": "2024-06-16T17:03:22.123-07:00"}
    result = ollama_show_to_model(show, model_id="llama3.2", owned_by="local")
    assert result == {
        "id": "llama3.2",
        "object": "model",
        "created": 1718582602,
        "owned_by": "local",
    }
    assert_valid("Model", result)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)
tag_entry = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "model": json_values,
        "modified_at": json_values | st.datetimes().map(str),
    },
)


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.just("models"), st.lists(tag_entry | json_values, max_size=5) | json_values)
)
def test_any_tags_response_gives_a_valid_list(tags: dict[str, Any]) -> None:
    assert_valid("ListModelsResponse", ollama_tags_to_models(tags, owned_by="b"))
