"""
Request fields as each kind of server reads them: pure functions, no I/O.

OpenAI-compatible servers agree on most of a request and differ on a few
fields, silently: llama.cpp and LM Studio read ``max_tokens`` and ignore
``max_completion_tokens`` (so a client of the newer field gets an answer
with no limit at all), TGI takes either but refuses both at once, wants
``logit_bias`` as a list and ``response_format`` in its own shape.  Each
function here rewrites one of those differences, and the kinds'
``adapt`` methods (:mod:`oproxy.backends.lmstudio` and the rest) say which
they need.
"""

from __future__ import annotations

from typing import Any

from oproxy.errors import InvalidRequest


def max_tokens_only(payload: dict[str, Any]) -> dict[str, Any]:
    """
    ``max_completion_tokens`` sent as ``max_tokens``, for servers that read
    only the older name.  OpenAI's rule is kept: when both are given, the
    newer one wins.
    """
    if "max_completion_tokens" not in payload:
        return payload
    shaped = dict(payload)
    limit = shaped.pop("max_completion_tokens")
    if limit is not None:
        shaped["max_tokens"] = limit
    return shaped


def without(payload: dict[str, Any], *names: str) -> dict[str, Any]:
    """``payload`` less the fields ``names`` (a server refuses or misreads them)."""
    if not any(name in payload for name in names):
        return payload
    return {key: value for key, value in payload.items() if key not in names}


def tgi_response_format(value: Any) -> Any:
    """
    OpenAI's ``response_format`` in text-generation-inference's shape
    (``{"type": ..., "value": ...}``, a serde-tagged enum), or ``None``
    for plain text, which TGI has no name for.

    * ``{"type": "json_schema", "json_schema": {"name", "schema"}}`` becomes
      ``{"type": "json_schema", "value": {"name", "schema"}}``;
    * ``{"type": "json_object"}`` becomes ``{"type": "json", "value":
      {"type": "object"}}``: any JSON object;
    * ``{"type": "text"}`` goes.

    :raises InvalidRequest: for a shape neither side knows.
    """
    if not isinstance(value, dict):
        raise InvalidRequest(
            "response_format must be an object", param="response_format", code="invalid_type"
        )
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    if kind == "json_schema":
        schema = value.get("json_schema")
        if not isinstance(schema, dict) or not isinstance(schema.get("schema"), dict):
            raise InvalidRequest(
                "response_format.json_schema.schema must be an object",
                param="response_format.json_schema.schema",
                code="invalid_type",
            )
        shaped = {"schema": schema["schema"]}
        if isinstance(schema.get("name"), str):
            shaped["name"] = schema["name"]
        return {"type": "json_schema", "value": shaped}
    if "value" in value and kind in ("json", "regex", "json_schema"):
        return value  # already TGI's own shape
    raise InvalidRequest(
        f"response_format type {kind!r} is not one of 'text', 'json_object' or 'json_schema'",
        param="response_format.type",
        code="invalid_value",
    )
