"""
OpenAI's Responses API (``/v1/responses``) ⇄ chat completions.

A Responses request becomes a chat request, which every backend kind
already answers (Ollama through :mod:`oproxy.translate.chat`, the others as
it is); the ``chat.completion`` that comes back, or its stream of chunks,
becomes a ``response`` object, or the Responses API's typed events.

The request side normalises ``input`` into *items* (what ``GET
/v1/responses/{id}/input_items`` lists and what a stored response keeps,
each with an id), then turns a conversation of items into chat messages:
messages with text and image parts, ``function_call`` items joined onto the
assistant turn they follow, ``function_call_output`` items as ``tool``
messages, and ``reasoning`` items as the next assistant turn's
``reasoning_content``.  ``instructions`` is the system message; a chained
request (``previous_response_id``) puts the earlier items first, and, as
OpenAI does, not the earlier instructions.

Everything here is pure: no I/O, ids drawn at random.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from oproxy.errors import OProxyError, RateLimited
from oproxy.translate.chunks import ChunkTranslator
from oproxy.translate.common import (
    as_array,
    as_object,
    as_string,
    ensure_json_safe,
    invalid_value,
    join_path,
    missing_parameter,
    new_completion_id,
    optional_boolean,
    optional_integer,
    optional_number,
    optional_object,
    optional_string,
    present,
    require_object_body,
    required_object,
    required_string,
    set_given,
    token_count,
    unexpected_value,
    unsupported_value,
    wrong_type,
)
from oproxy.translate.tools import chosen_format, function_definition, function_tool

#: Request fields that have no meaning for a chat backend and are refused
#: rather than silently dropped: the client would wait for what never comes.
_UNSUPPORTED_FIELDS: Final[Mapping[str, str]] = {
    "background": "Background responses are not supported by this server.",
    "conversation": "Conversations are not supported by this server; "
    "use previous_response_id to continue a response.",
    "prompt": "Prompt templates are not supported by this server.",
}

#: OpenAI's reasoning efforts (``ReasoningEffort``).
_EFFORTS: Final = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

#: Ollama's own knobs, passed on to the chat request as a chat client sends them.
_PASSED_THROUGH: Final = ("options", "keep_alive")

#: The events that stream the text of a reasoning item and of a message:
#: its deltas, and its whole once done.  A message's carry its (empty)
#: ``logprobs``; a reasoning item's have none.
_TEXT_EVENTS: Final[Mapping[str, tuple[str, str]]] = {
    "reasoning": ("response.reasoning_text.delta", "response.reasoning_text.done"),
    "message": ("response.output_text.delta", "response.output_text.done"),
}

#: The codes a ``response.error`` may carry (OpenAI's ``ResponseErrorCode``).
_RESPONSE_ERROR_CODES: Final = frozenset(
    {
        "server_error",
        "rate_limit_exceeded",
        "invalid_prompt",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "image_too_large",
        "image_too_small",
        "image_parse_error",
        "image_content_policy_violation",
        "invalid_image_mode",
        "image_file_too_large",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)


def new_response_id() -> str:
    """A response's id, ``resp_`` and random letters, as OpenAI's look."""
    return new_completion_id("resp_")


# ==========================================================================
# Request: input items


def _text_part(part: Mapping[str, Any], param: str, kind: str) -> dict[str, Any]:
    text = required_string(part, "text", join_path(param, "text"))
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": text}


def _image_part(part: Mapping[str, Any], param: str) -> dict[str, Any]:
    if present(part, "file_id") is not None:
        raise unsupported_value(
            join_path(param, "file_id"),
            "Images by file_id are not supported by this server; send an image_url "
            "(an http(s) URL or a data URL).",
        )
    url = required_string(part, "image_url", join_path(param, "image_url"))
    detail = optional_string(part, "detail", join_path(param, "detail")) or "auto"
    if detail not in ("auto", "low", "high", "original"):
        raise unexpected_value(join_path(param, "detail"), "expected 'auto', 'low' or 'high'.")
    return {"type": "input_image", "image_url": url, "detail": detail}


def _input_parts(content: object, param: str) -> list[dict[str, Any]]:
    """A user, system or developer message's content as ``input_*`` parts."""
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    parts = []
    for index, part in enumerate(as_array(content, param)):
        part_param = join_path(param, index)
        part = as_object(part, part_param)
        kind = part.get("type")
        if kind is None:
            raise missing_parameter(join_path(part_param, "type"))
        if kind in ("input_text", "text", "output_text"):
            parts.append(_text_part(part, part_param, "input_text"))
        elif kind == "input_image":
            parts.append(_image_part(part, part_param))
        elif kind in ("input_file", "input_audio"):
            raise unsupported_value(
                join_path(part_param, "type"),
                f"Content parts of type {kind!r} are not supported by this server.",
            )
        else:
            raise unexpected_value(
                join_path(part_param, "type"),
                f"expected 'input_text' or 'input_image', but got {kind!r}.",
            )
    return parts


def _output_parts(content: object, param: str) -> list[dict[str, Any]]:
    """An assistant message's content as ``output_text`` and ``refusal`` parts."""
    if isinstance(content, str):
        return [{"type": "output_text", "text": content, "annotations": [], "logprobs": []}]
    parts = []
    for index, part in enumerate(as_array(content, param)):
        part_param = join_path(param, index)
        part = as_object(part, part_param)
        kind = part.get("type")
        if kind in ("output_text", "input_text", "text"):
            parts.append(_text_part(part, part_param, "output_text"))
        elif kind == "refusal":
            refusal = required_string(part, "refusal", join_path(part_param, "refusal"))
            parts.append({"type": "refusal", "refusal": refusal})
        elif kind is None:
            raise missing_parameter(join_path(part_param, "type"))
        else:
            raise unexpected_value(
                join_path(part_param, "type"),
                f"an assistant message holds 'output_text' or 'refusal' parts, not {kind!r}.",
            )
    return parts


def _item_id(item: Mapping[str, Any], param: str, prefix: str) -> str:
    given = optional_string(item, "id", join_path(param, "id"))
    return given or new_completion_id(prefix)


def _message_item(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    role = as_string(item["role"], join_path(param, "role"))
    if role not in ("user", "system", "developer", "assistant"):
        raise unexpected_value(
            join_path(param, "role"),
            f"expected one of 'user', 'system', 'developer' or 'assistant', but got {role!r}.",
        )
    if item.get("content") is None:
        raise missing_parameter(join_path(param, "content"))
    # An assistant's words are output (text, refusals); the others' input.
    parts = _output_parts if role == "assistant" else _input_parts
    return {
        "type": "message",
        "id": _item_id(item, param, "msg_"),
        "role": role,
        "content": parts(item["content"], join_path(param, "content")),
        "status": "completed",
    }


def _function_call_item(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    for field in ("call_id", "name", "arguments"):
        if item.get(field) is None:
            raise missing_parameter(join_path(param, field))
    return {
        "type": "function_call",
        "id": _item_id(item, param, "fc_"),
        "call_id": as_string(item["call_id"], join_path(param, "call_id")),
        "name": as_string(item["name"], join_path(param, "name")),
        "arguments": as_string(item["arguments"], join_path(param, "arguments")),
        "status": "completed",
    }


def _function_output_item(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    if item.get("call_id") is None:
        raise missing_parameter(join_path(param, "call_id"))
    if item.get("output") is None:
        raise missing_parameter(join_path(param, "output"))
    output = item["output"]
    output_param = join_path(param, "output")
    if not isinstance(output, str):
        output = _input_parts(output, output_param)
    return {
        "type": "function_call_output",
        "id": _item_id(item, param, "fco_"),
        "call_id": as_string(item["call_id"], join_path(param, "call_id")),
        "output": output,
        "status": "completed",
    }


def _reasoning_texts(entries: object, param: str) -> list[dict[str, Any]]:
    if entries is None:
        return []
    texts = []
    for index, entry in enumerate(as_array(entries, param)):
        entry = as_object(entry, join_path(param, index))
        text = optional_string(entry, "text", join_path(param, index, "text"))
        kind = optional_string(entry, "type", join_path(param, index, "type"))
        if text is not None:
            texts.append({"type": kind or "summary_text", "text": text})
    return texts


def _reasoning_item(item: Mapping[str, Any], param: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": _item_id(item, param, "rs_"),
        "summary": _reasoning_texts(present(item, "summary"), join_path(param, "summary")),
        "content": _reasoning_texts(present(item, "content"), join_path(param, "content")),
    }


def _input_item(item: object, param: str) -> dict[str, Any]:
    item = as_object(item, param)
    kind = present(item, "type")
    if kind is None or kind == "message":
        if item.get("role") is None:
            raise missing_parameter(join_path(param, "role"))
        return _message_item(item, param)
    if kind == "function_call":
        return _function_call_item(item, param)
    if kind == "function_call_output":
        return _function_output_item(item, param)
    if kind == "reasoning":
        return _reasoning_item(item, param)
    if kind == "item_reference":
        raise unsupported_value(
            join_path(param, "type"),
            "Item references are not supported by this server: send the item itself, "
            "or continue a stored response with previous_response_id.",
        )
    if not isinstance(kind, str):
        raise wrong_type(join_path(param, "type"), "a string", kind)
    raise unsupported_value(
        join_path(param, "type"),
        f"Input items of type {kind!r} are not supported by this server: it takes "
        "messages, function_call, function_call_output and reasoning items.",
    )


def input_items(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """
    The request's ``input`` as items, each with an id: a string is one user
    message.  What ``input_items`` lists later, and what a chained request
    builds on.

    :raises InvalidRequest: naming the first bad field.
    """
    body = require_object_body(body)
    if body.get("input") is None:
        raise missing_parameter("input")
    value = body["input"]
    if isinstance(value, str):
        return [_message_item({"role": "user", "content": value}, "input")]
    items = as_array(value, "input")
    return [_input_item(item, join_path("input", index)) for index, item in enumerate(items)]


# ==========================================================================
# Request: items as chat messages


def _chat_parts(parts: Sequence[Mapping[str, Any]]) -> str | list[dict[str, Any]]:
    """``input_*`` parts as chat content: one string when it is all text."""
    if all(part["type"] == "input_text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    chat: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "input_text":
            chat.append({"type": "text", "text": part["text"]})
        else:
            image_url = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high"):
                image_url["detail"] = part["detail"]
            chat.append({"type": "image_url", "image_url": image_url})
    return chat


def _reasoning_of(item: Mapping[str, Any]) -> str:
    texts = [entry["text"] for entry in item.get("content") or ()] or [
        entry["text"] for entry in item.get("summary") or ()
    ]
    return "\n".join(texts)


def chat_messages(instructions: str | None, items: Sequence[Mapping[str, Any]]) -> list[Any]:
    """
    The conversation ``items`` as chat messages, after ``instructions``.

    An assistant turn is one chat message: its text, the function calls that
    follow it (until a message or a tool output comes between) as
    ``tool_calls``, and the reasoning before it as ``reasoning_content``.
    """
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    reasoning: list[str] = []
    # The assistant message that function calls would join, while there is one.
    turn: dict[str, Any] | None = None

    def assistant_turn(content: str | None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = "\n".join(reasoning)
            reasoning.clear()
        messages.append(message)
        return message

    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            text = _reasoning_of(item)
            if text:
                reasoning.append(text)
        elif kind == "function_call":
            if turn is None:
                turn = assistant_turn(None)
            turn.setdefault("tool_calls", []).append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
            )
        elif kind == "function_call_output":
            turn = None
            output = item["output"]
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": output if isinstance(output, str) else _chat_parts(output),
                }
            )
        elif item["role"] == "assistant":
            texts = [
                part["text"] if part["type"] == "output_text" else part["refusal"]
                for part in item["content"]
            ]
            turn = assistant_turn("".join(texts))
        else:
            turn = None
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _chat_parts(item["content"])})
    return messages


# ==========================================================================
# Request: tools, format, reasoning, sampling


def _chat_tool(tool: object, param: str) -> dict[str, Any]:
    tool = function_tool(
        tool,
        param,
        "Tools of type {kind!r} are not supported by this server: only function tools are.",
    )
    function = function_definition(tool, param)
    set_given(function, "strict", optional_boolean(tool, "strict", join_path(param, "strict")))
    return {"type": "function", "function": function}


def chat_tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``tools`` as chat tools; only function tools exist on a chat backend."""
    value = present(body, "tools")
    if value is None:
        return []
    return [
        _chat_tool(tool, join_path("tools", i)) for i, tool in enumerate(as_array(value, "tools"))
    ]


def _named(entry: Mapping[str, Any], param: str) -> dict[str, Any]:
    if entry.get("type") != "function":
        raise unsupported_value(
            join_path(param, "type"), "Only function tools can be chosen on this server."
        )
    name = required_string(entry, "name", join_path(param, "name"))
    return {"type": "function", "function": {"name": name}}


def chat_tool_choice(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """``tool_choice`` as the chat API's."""
    choice = present(body, "tool_choice")
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise unexpected_value(
                "tool_choice", "expected 'none', 'auto', 'required' or an object."
            )
        return choice
    choice = as_object(choice, "tool_choice")
    if choice.get("type") == "allowed_tools":
        mode = optional_string(choice, "mode", "tool_choice.mode") or "auto"
        if mode not in ("auto", "required"):
            raise invalid_value("tool_choice.mode", "Expected 'auto' or 'required'.")
        if choice.get("tools") is None:
            raise missing_parameter("tool_choice.tools")
        tools = as_array(choice["tools"], "tool_choice.tools")
        return {
            "type": "allowed_tools",
            "allowed_tools": {
                "mode": mode,
                "tools": [
                    _named(
                        as_object(entry, join_path("tool_choice.tools", i)),
                        f"tool_choice.tools.{i}",
                    )
                    for i, entry in enumerate(tools)
                ],
            },
        }
    return _named(choice, "tool_choice")


def chat_response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """``text.format`` as the chat API's ``response_format``."""
    text = optional_object(body, "text", "text")
    chosen = None if text is None else chosen_format(text, "format", "text.format")
    if chosen is None:
        return None
    kind, format_ = chosen
    if kind == "json_object":
        return {"type": "json_object"}
    schema = required_object(format_, "schema", "text.format.schema")
    json_schema: dict[str, Any] = {
        "name": optional_string(format_, "name", "text.format.name") or "response",
        "schema": dict(ensure_json_safe(schema, "text.format.schema")),
    }
    description = optional_string(format_, "description", "text.format.description")
    if description is not None:
        json_schema["description"] = description
    strict = optional_boolean(format_, "strict", "text.format.strict")
    if strict is not None:
        json_schema["strict"] = strict
    return {"type": "json_schema", "json_schema": json_schema}


def instructions_of(body: Mapping[str, Any]) -> str | None:
    """``instructions``: a string, the system message of this request only."""
    return optional_string(body, "instructions", "instructions")


def chat_request(
    body: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    items: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """
    The chat completions request for a Responses request.

    :param history: the items of the responses it continues (their input
        and output, oldest first); empty without ``previous_response_id``.
    :param items: its own input, from :func:`input_items`.
    :raises InvalidRequest: naming the first bad field.
    """
    body = require_object_body(body)
    for field, message in _UNSUPPORTED_FIELDS.items():
        if field == "background":
            if optional_boolean(body, field, field):
                raise unsupported_value(field, message)
        elif present(body, field) is not None:
            raise unsupported_value(field, message)
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": chat_messages(instructions_of(body), [*history, *items]),
    }
    tools = chat_tools(body)
    if tools:
        chat["tools"] = tools
        choice = chat_tool_choice(body)
        if choice is not None:
            chat["tool_choice"] = choice
        parallel = optional_boolean(body, "parallel_tool_calls", "parallel_tool_calls")
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel
    else:
        chat_tool_choice(body)  # still checked
    response_format = chat_response_format(body)
    if response_format is not None:
        chat["response_format"] = response_format
    effort = reasoning_effort(body)
    if effort is not None:
        chat["reasoning_effort"] = effort
    limit = optional_integer(body, "max_output_tokens", "max_output_tokens", minimum=1)
    if limit is not None:
        chat["max_completion_tokens"] = limit
    for name, maximum in (("temperature", 2), ("top_p", 1)):
        value = optional_number(body, name, name, minimum=0, maximum=maximum)
        if value is not None:
            chat[name] = value
    for name in _PASSED_THROUGH:
        if present(body, name) is not None:
            chat[name] = body[name]
    if optional_boolean(body, "stream", "stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def reasoning_effort(body: Mapping[str, Any]) -> str | None:
    """``reasoning.effort``, one of OpenAI's levels."""
    reasoning = optional_object(body, "reasoning", "reasoning")
    if reasoning is None:
        return None
    effort = optional_string(reasoning, "effort", "reasoning.effort")
    if effort is not None and effort not in _EFFORTS:
        raise unexpected_value(
            "reasoning.effort",
            f"{effort!r} (expected one of " + ", ".join(f"'{level}'" for level in _EFFORTS) + ").",
        )
    return effort


# ==========================================================================
# Response: the object


def response_template(
    body: Mapping[str, Any], *, response_id: str, created_at: int, store: bool
) -> dict[str, Any]:
    """
    A ``response`` object as the request describes it, with no output yet
    (``in_progress``): what the stream's first events carry, and the frame
    of the finished response.
    """
    reasoning = optional_object(body, "reasoning", "reasoning") or {}
    text = optional_object(body, "text", "text") or {}
    tools = [_echoed_tool(tool) for tool in chat_tools(body)]
    metadata = present(body, "metadata")
    user = present(body, "user")
    template = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": instructions_of(body),
        "max_output_tokens": present(body, "max_output_tokens"),
        "model": body.get("model"),
        "output": [],
        "parallel_tool_calls": present(body, "parallel_tool_calls") is not False,
        "previous_response_id": present(body, "previous_response_id"),
        "reasoning": {
            "effort": reasoning.get("effort"),
            "summary": reasoning.get("summary"),
        },
        "store": store,
        "temperature": _number_or(present(body, "temperature"), 1.0),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": present(body, "tool_choice") or "auto",
        "tools": tools,
        "top_p": _number_or(present(body, "top_p"), 1.0),
        "truncation": present(body, "truncation") or "disabled",
        "metadata": metadata if isinstance(metadata, Mapping) else {},
    }
    if isinstance(user, str):
        template["user"] = user
    return template


def _number_or(value: object, default: float) -> Any:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else default


def _echoed_tool(chat_tool: Mapping[str, Any]) -> dict[str, Any]:
    function = chat_tool["function"]
    return {
        "type": "function",
        "name": function["name"],
        "description": function.get("description"),
        "parameters": function.get("parameters"),
        "strict": function.get("strict"),
    }


def usage_of(chat_usage: object) -> dict[str, Any] | None:
    """A chat ``usage`` as the Responses API's, or ``None`` when there is none."""
    if not isinstance(chat_usage, Mapping):
        return None
    prompt = token_count(chat_usage.get("prompt_tokens"))
    completion = token_count(chat_usage.get("completion_tokens"))
    prompt_details = chat_usage.get("prompt_tokens_details")
    completion_details = chat_usage.get("completion_tokens_details")
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, Mapping) else 0
    reasoning = (
        completion_details.get("reasoning_tokens") if isinstance(completion_details, Mapping) else 0
    )
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": token_count(cached), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": token_count(reasoning)},
        "total_tokens": token_count(chat_usage.get("total_tokens")) or prompt + completion,
    }


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _mapping(value: object) -> Mapping[str, Any]:
    """An object from upstream; anything else reads as empty."""
    return value if isinstance(value, Mapping) else {}


def reasoning_text(message: Mapping[str, Any]) -> str:
    """A chat message's (or delta's) reasoning, by either name servers use."""
    return _text(message.get("reasoning_content")) or _text(message.get("reasoning"))


def _finished(finish_reason: object, at: int) -> dict[str, Any]:
    """The status fields of a response that ended with ``finish_reason``."""
    if finish_reason == "length":
        return {
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "completed_at": None,
        }
    if finish_reason == "content_filter":
        return {
            "status": "incomplete",
            "incomplete_details": {"reason": "content_filter"},
            "completed_at": None,
        }
    return {"status": "completed", "incomplete_details": None, "completed_at": at}


def output_of(message: Mapping[str, Any], finish_reason: object) -> list[dict[str, Any]]:
    """A chat message as output items: reasoning, the message, function calls."""
    output: list[dict[str, Any]] = []
    status = "incomplete" if finish_reason == "length" else "completed"
    thought = reasoning_text(message)
    if thought:
        output.append(_reasoning_output(new_completion_id("rs_"), thought))
    content: list[dict[str, Any]] = []
    text = _text(message.get("content"))
    if text:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    refusal = _text(message.get("refusal"))
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    if content:
        output.append(
            {
                "type": "message",
                "id": new_completion_id("msg_"),
                "status": status,
                "role": "assistant",
                "content": content,
            }
        )
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        output.append(
            {
                "type": "function_call",
                "id": new_completion_id("fc_"),
                "call_id": _text(call.get("id")) or new_completion_id("call_"),
                "name": _text(function.get("name")),
                "arguments": _text(function.get("arguments")) or "{}",
                "status": "completed",
            }
        )
    return output


def _reasoning_output(item_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": "completed",
    }


def response_from_chat(
    template: Mapping[str, Any], completion: Mapping[str, Any], *, completed_at: int
) -> dict[str, Any]:
    """The finished ``response`` for a ``chat.completion``."""
    choices = completion.get("choices") or [{}]
    choice = _mapping(choices[0])
    message = _mapping(choice.get("message"))
    finish_reason = choice.get("finish_reason")
    response = {
        **template,
        **_finished(finish_reason, completed_at),
        "output": output_of(message, finish_reason),
    }
    return _with_usage(response, usage_of(completion.get("usage")))


def _with_usage(response: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    """``response`` with its usage, when the backend told it."""
    if usage is not None:
        response["usage"] = usage
    return response


# ==========================================================================
# Response: the stream


def response_error(error: OProxyError) -> dict[str, str]:
    """A failure as a ``response.error``, whose ``code`` is one of OpenAI's list."""
    code = error.code if error.code in _RESPONSE_ERROR_CODES else None
    if code is None:
        code = "rate_limit_exceeded" if isinstance(error, RateLimited) else "server_error"
    return {"code": code, "message": error.message}


class ResponseStream(ChunkTranslator):
    """
    ``chat.completion.chunk`` objects in, the Responses API's events out.

    Each output item is opened (``response.output_item.added``), fed
    (content part, deltas) and closed (``.done`` events) in turn: reasoning,
    then the message, then each function call, as the chunks bring them.
    The usage comes with the chat stream's last chunk, so the finished
    response (``response.completed``, or ``response.incomplete`` when the
    output was cut at ``max_output_tokens``) is sent once the chunks end.

    :ivar response: the response as it stands; finished after :meth:`finish`.
    """

    def __init__(self, template: Mapping[str, Any], now: Callable[[], int]) -> None:
        super().__init__()
        self.response: dict[str, Any] = dict(template)
        self._now = now
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        #: The item being streamed: its kind and its index in the output.
        self._open: tuple[str, int] | None = None
        #: Function-call items by the chat stream's tool-call index.
        self._calls: dict[int, int] = {}
        self._finish_reason: object = None
        self._usage: dict[str, Any] | None = None
        self.finished = False

    # -- events ---------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": [dict(item) for item in self._output]}

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        self.started = True
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def _note_usage(self, usage: object) -> None:
        responses_usage = usage_of(usage)
        if responses_usage is not None:
            self._usage = responses_usage

    def _note_finish(self, choice: Mapping[str, Any]) -> None:
        self._finish_reason = choice["finish_reason"]

    def _delta(self, delta: Mapping[str, Any], events: list[dict[str, Any]]) -> None:
        for kind, text in (
            ("reasoning", reasoning_text(delta)),
            ("message", _text(delta.get("content"))),
        ):
            if text:
                index = self._item(kind, events)
                item = self._output[index]
                item["content"][0]["text"] += text
                event = self._event(
                    _TEXT_EVENTS[kind][0],
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    delta=text,
                )
                if kind == "message":
                    event["logprobs"] = []
                events.append(event)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, Mapping):
                self._call_delta(call, events)

    def _call_delta(self, call: Mapping[str, Any], events: list[dict[str, Any]]) -> None:
        number = call.get("index", 0)
        function = _mapping(call.get("function"))
        index = self._calls.get(number)
        if index is None:
            self._close(events)
            index = len(self._output)
            self._calls[number] = index
            item = {
                "type": "function_call",
                "id": new_completion_id("fc_"),
                "call_id": _text(call.get("id")) or new_completion_id("call_"),
                "name": _text(function.get("name")),
                "arguments": "",
                "status": "in_progress",
            }
            self._output.append(item)
            self._open = ("function_call", index)
            events.append(
                self._event("response.output_item.added", output_index=index, item=dict(item))
            )
        item = self._output[index]
        if not item["name"]:
            item["name"] = _text(function.get("name"))
        fragment = _text(function.get("arguments"))
        if fragment:
            item["arguments"] += fragment
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=fragment,
                )
            )

    def _item(self, kind: str, events: list[dict[str, Any]]) -> int:
        """The output index of the open item of ``kind``, opening one if need be."""
        if self._open is not None and self._open[0] == kind:
            return self._open[1]
        self._close(events)
        index = len(self._output)
        if kind == "reasoning":
            item: dict[str, Any] = {
                "type": "reasoning",
                "id": new_completion_id("rs_"),
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {
                "type": "message",
                "id": new_completion_id("msg_"),
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._output.append(item)
        self._open = (kind, index)
        events.append(
            self._event("response.output_item.added", output_index=index, item=dict(item))
        )
        item["content"] = [part]
        events.append(self._part_event("response.content_part.added", item, index, part=dict(part)))
        return index

    def _part_event(
        self, name: str, item: Mapping[str, Any], index: int, **fields: Any
    ) -> dict[str, Any]:
        """An event about the one content part of the item at ``index``."""
        return self._event(name, item_id=item["id"], output_index=index, content_index=0, **fields)

    def _close(self, events: list[dict[str, Any]]) -> None:
        """End the open item with its ``.done`` events."""
        if self._open is None:
            return
        kind, index = self._open
        self._open = None
        item = self._output[index]
        status = (
            "incomplete" if self._finish_reason == "length" and kind == "message" else "completed"
        )
        item["status"] = status
        if kind == "function_call":
            item["arguments"] = item["arguments"] or "{}"
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    name=item["name"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        else:
            part = dict(item["content"][0])
            done = self._part_event(_TEXT_EVENTS[kind][1], item, index, text=part["text"])
            if kind == "message":
                done["logprobs"] = []
            events.append(done)
            events.append(self._part_event("response.content_part.done", item, index, part=part))
        events.append(self._event("response.output_item.done", output_index=index, item=dict(item)))

    def finish(self) -> list[dict[str, Any]]:
        """Close the last item; then the finished response."""
        events = [] if self.started else self.start()
        self._close(events)
        self.finished = True
        self.response = _with_usage(
            {**self._snapshot(), **_finished(self._finish_reason, self._now())}, self._usage
        )
        kind = (
            "response.incomplete"
            if self.response["status"] == "incomplete"
            else "response.completed"
        )
        events.append(self._event(kind, response=self.response))
        return events

    def failure(self, error: OProxyError) -> list[dict[str, Any]]:
        """
        The events of a stream that fails: an ``error`` event, then, when
        the response was announced, ``response.failed``.
        """
        events = [
            self._event(
                "error",
                code=error.code or error.error_type,
                message=error.message,
                param=error.param,
            )
        ]
        if self.started and not self.finished:
            self.finished = True
            self.response = _with_usage(
                {**self._snapshot(), "status": "failed", "error": response_error(error)},
                self._usage,
            )
            events.append(self._event("response.failed", response=self.response))
        return events
