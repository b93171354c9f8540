"""
Function tools and response formats as the chat API has them, read from
each API's way of sending them: a chat tool's ``function``, a Responses
tool, an Anthropic tool; the chat API's ``response_format`` and the
Responses API's ``text.format``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oproxy.translate.common import (
    as_object,
    ensure_json_safe,
    join_path,
    missing_parameter,
    optional_object,
    optional_string,
    required_object,
    required_string,
    set_given,
    unexpected_value,
    unsupported_value,
)


def function_tool(tool: object, param: str, refusal: str) -> Mapping[str, Any]:
    """
    A ``tools`` entry, checked to be an object of ``type`` ``function``:
    the only tools a chat backend runs.  Another type is refused with
    ``refusal``, in which ``{kind!r}`` stands for the type sent.
    """
    tool = as_object(tool, param)
    kind = tool.get("type")
    if kind is None:
        raise missing_parameter(join_path(param, "type"))
    if kind != "function":
        raise unsupported_value(join_path(param, "type"), refusal.format(kind=kind))
    return tool


def function_definition(
    source: Mapping[str, Any], param: str, *, schema: str = "parameters", required: bool = False
) -> dict[str, Any]:
    """
    A function tool as the chat API's ``function``: its name, description
    and the JSON Schema of its arguments, read from ``source`` (a chat
    tool's ``function``, a Responses tool, an Anthropic tool), which keeps
    the schema under ``schema``, ``required`` or not.
    """
    function: dict[str, Any] = {"name": required_string(source, "name", join_path(param, "name"))}
    description = optional_string(source, "description", join_path(param, "description"))
    set_given(function, "description", description)
    schema_param = join_path(param, schema)
    arguments = (required_object if required else optional_object)(source, schema, schema_param)
    if arguments is not None:
        function["parameters"] = dict(ensure_json_safe(arguments, schema_param))
    return function


def chosen_format(
    body: Mapping[str, Any], key: str, param: str
) -> tuple[str, Mapping[str, Any]] | None:
    """
    The response format ``body[key]`` asks for (the chat API's
    ``response_format``, the Responses API's ``text.format``), with its
    ``type``: ``json_object`` or ``json_schema``.  None when there is none,
    or it is plain ``text``: the model answers as it would anyway.
    """
    format_ = optional_object(body, key, param)
    if format_ is None:
        return None
    kind = format_.get("type")
    if kind is None:
        raise missing_parameter(join_path(param, "type"))
    if kind not in ("text", "json_object", "json_schema"):
        raise unexpected_value(
            join_path(param, "type"),
            f"expected 'text', 'json_object' or 'json_schema', but got {kind!r}.",
        )
    return None if kind == "text" else (kind, format_)
