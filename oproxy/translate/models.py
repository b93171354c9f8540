"""
``/v1/models`` from Ollama's ``/api/tags`` and ``/api/show``.

``owned_by`` is the backend name the caller passes, so a client that lists
models across several backends can tell where each one lives.  An empty
list is ``"data": []``: Ollama's /v1 sends ``null``, which strict clients
reject.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oproxy.errors import UpstreamError
from oproxy.translate.common import created_from_ollama


def _model(model_id: str, modified_at: object, owned_by: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created_from_ollama(modified_at, 0),
        "owned_by": owned_by,
    }


def _tag_id(entry: Mapping[str, Any]) -> str | None:
    """The model id of a tags entry: ``model``, falling back to ``name``."""
    for key in ("model", "name"):
        value = entry.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def model_from_tag(entry: Mapping[str, Any], *, owned_by: str) -> dict[str, Any]:
    """
    One OpenAI ``model`` from one ``/api/tags`` entry.

    :raises UpstreamError: if the entry has neither ``model`` nor ``name``.
    """
    model_id = _tag_id(entry)
    if model_id is None:
        raise UpstreamError("The upstream listed a model with neither 'model' nor 'name'.")
    return _model(model_id, entry.get("modified_at"), owned_by)


def ollama_tags_to_models(tags: Mapping[str, Any], *, owned_by: str) -> dict[str, Any]:
    """
    An OpenAI model ``list`` from an ``/api/tags`` response, in its order.

    Entries without a usable id are skipped rather than failing the listing.
    """
    entries = tags.get("models")
    data = [
        model_from_tag(entry, owned_by=owned_by)
        for entry in (entries if isinstance(entries, list) else [])
        if isinstance(entry, Mapping) and _tag_id(entry) is not None
    ]
    return {"object": "list", "data": data}


def ollama_show_to_model(
    show: Mapping[str, Any], *, model_id: str, owned_by: str
) -> dict[str, Any]:
    """
    One OpenAI ``model`` from an ``/api/show`` response.

    ``model_id`` is the id the client asked for, echoed as OpenAI does;
    ``/api/show`` itself does not repeat the name.
    """
    return _model(model_id, show.get("modified_at"), owned_by)
