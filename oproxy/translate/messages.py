"""
Anthropic's Messages API (``/v1/messages``) ⇄ chat completions.

A Messages request becomes a chat request, which every backend kind
already answers; the ``chat.completion`` that comes back, or its stream of
chunks, becomes a ``message`` object, or Anthropic's stream events.

The request side: ``system`` is the system message; a user turn's
``tool_result`` blocks become ``tool`` messages (first, as the chat API
wants them right after the assistant's calls), and its text and images a
user message after them; an assistant turn's text, ``thinking`` and
``tool_use`` blocks become one assistant message with ``reasoning_content``
and ``tool_calls``.  ``thinking.budget_tokens`` becomes a reasoning effort
(Ollama's ``think`` level), ``stop_sequences`` the chat ``stop``, ``top_k``
a runtime option where the backend takes one.

The response side: ``stop_reason`` is ``tool_use`` for a tool call,
``max_tokens`` for a cut answer, ``stop_sequence`` when the backend says
which stop sequence ended it (vLLM's ``stop_reason``), else ``end_turn``.

Everything here is pure: no I/O, ids drawn at random.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import orjson

from oproxy.translate.chunks import ChunkTranslator
from oproxy.translate.common import (
    as_array,
    as_object,
    as_string,
    compact_json,
    ensure_json_safe,
    invalid_value,
    join_path,
    missing_parameter,
    new_completion_id,
    objects_of,
    optional_boolean,
    optional_integer,
    optional_number,
    optional_object,
    optional_string,
    present,
    require_object_body,
    required_object,
    required_string,
    token_count,
    unexpected_value,
    unsupported_value,
    wrong_type,
)
from oproxy.translate.responses import reasoning_text
from oproxy.translate.tools import function_definition


def _mapping(value: object) -> Mapping[str, Any]:
    """An object from upstream; anything else reads as empty."""
    return value if isinstance(value, Mapping) else {}


#: Thinking budgets, in tokens, up to which each reasoning effort is asked
#: for; above the last, ``high``.  Claude Code's "think" (4000), "think
#: hard" (10000) and "ultrathink" (31999) land on low, medium and high.
_BUDGET_EFFORTS: Final = ((8192, "low"), (24576, "medium"))

#: Ollama's own knobs, passed on to the chat request as a chat client sends them.
_PASSED_THROUGH: Final = ("options", "keep_alive")

_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def new_message_id() -> str:
    """A message's id, ``msg_`` and random letters, as Anthropic's look."""
    return new_completion_id("msg_")


# ==========================================================================
# Request: content blocks


def _blocks(content: object, param: str) -> Iterator[tuple[str, Mapping[str, Any], str]]:
    """Each content block of ``content`` (an array): its type, itself, its ``param``."""
    for block, block_param in objects_of(content, param):
        yield required_string(block, "type", join_path(block_param, "type")), block, block_param


def _text_of(block: Mapping[str, Any], param: str) -> str:
    return required_string(block, "text", join_path(param, "text"))


def _image_part(block: Mapping[str, Any], param: str) -> dict[str, Any]:
    """An ``image`` block as a chat ``image_url`` part (a data URL, or the URL)."""
    source_param = join_path(param, "source")
    source = required_object(block, "source", source_param)
    kind = source.get("type")
    if kind == "base64":
        media_type = required_string(source, "media_type", join_path(source_param, "media_type"))
        if media_type not in _MEDIA_TYPES:
            raise unexpected_value(
                join_path(source_param, "media_type"),
                "expected one of 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'.",
            )
        data = required_string(source, "data", join_path(source_param, "data"))
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        url = required_string(source, "url", join_path(source_param, "url"))
        return {"type": "image_url", "image_url": {"url": url}}
    if kind is None:
        raise missing_parameter(join_path(source_param, "type"))
    raise unsupported_value(
        join_path(source_param, "type"),
        f"Image sources of type {kind!r} are not supported by this server: send 'base64' or 'url'.",
    )


def _unsupported_block(kind: str, param: str) -> Exception:
    return unsupported_value(
        join_path(param, "type"),
        f"Content blocks of type {kind!r} are not supported by this server.",
    )


def _tool_result_content(block: Mapping[str, Any], param: str) -> tuple[str, list[dict[str, Any]]]:
    """A ``tool_result``'s text, and its images (which a tool message cannot hold)."""
    content = present(block, "content")
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for kind, inner, inner_param in _blocks(content, join_path(param, "content")):
        if kind == "text":
            texts.append(_text_of(inner, inner_param))
        elif kind == "image":
            images.append(_image_part(inner, inner_param))
        else:
            raise _unsupported_block(kind, inner_param)
    return "\n".join(texts), images


def _user_messages(content: object, param: str) -> list[dict[str, Any]]:
    """A user turn: its tool results as ``tool`` messages, then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for kind, block, block_param in _blocks(content, param):
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, block_param)})
        elif kind == "image":
            parts.append(_image_part(block, block_param))
        elif kind == "tool_result":
            call_id = required_string(block, "tool_use_id", join_path(block_param, "tool_use_id"))
            optional_boolean(block, "is_error", join_path(block_param, "is_error"))
            text, images = _tool_result_content(block, block_param)
            tools.append({"role": "tool", "tool_call_id": call_id, "content": text})
            parts.extend(images)
        else:
            raise _unsupported_block(kind, block_param)
    messages = tools
    if parts or not tools:
        messages.append({"role": "user", "content": _chat_content(parts)})
    return messages


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Chat content: one string when every part is text."""
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def _assistant_message(content: object, param: str) -> dict[str, Any]:
    """An assistant turn as one chat message: text, reasoning, tool calls."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for kind, block, block_param in _blocks(content, param):
        if kind == "text":
            texts.append(_text_of(block, block_param))
        elif kind == "thinking":
            thinking = optional_string(block, "thinking", join_path(block_param, "thinking"))
            if thinking:
                thoughts.append(thinking)
        elif kind == "redacted_thinking":
            continue  # encrypted by another provider: nothing a model here can read
        elif kind == "tool_use":
            for field in ("id", "name"):
                if block.get(field) is None:
                    raise missing_parameter(join_path(block_param, field))
            arguments = present(block, "input")
            input_param = join_path(block_param, "input")
            calls.append(
                {
                    "id": as_string(block["id"], join_path(block_param, "id")),
                    "type": "function",
                    "function": {
                        "name": as_string(block["name"], join_path(block_param, "name")),
                        "arguments": compact_json(
                            ensure_json_safe(as_object(arguments or {}, input_param), input_param)
                        ),
                    },
                }
            )
        else:
            raise _unsupported_block(kind, block_param)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _system(body: Mapping[str, Any]) -> str | None:
    """``system``: a string, or text blocks joined."""
    system = present(body, "system")
    if system is None or isinstance(system, str):
        return system or None
    texts = []
    for kind, block, param in _blocks(system, "system"):
        if kind != "text":
            raise invalid_value(
                join_path(param, "type"), "Invalid system block: only 'text' blocks are allowed."
            )
        texts.append(_text_of(block, param))
    return "\n".join(texts) or None


def chat_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``system`` and ``messages`` as chat messages."""
    if body.get("messages") is None:
        raise missing_parameter("messages")
    turns = as_array(body["messages"], "messages")
    if not turns:
        raise invalid_value("messages", "messages: at least one message is required.")
    messages: list[dict[str, Any]] = []
    system = _system(body)
    if system:
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        param = join_path("messages", index)
        turn = as_object(turn, param)
        role = required_string(turn, "role", join_path(param, "role"))
        if "content" not in turn:
            raise missing_parameter(join_path(param, "content"))
        content = turn["content"]
        if not isinstance(content, str | list):
            raise wrong_type(
                join_path(param, "content"), "a string or an array of content blocks", content
            )
        if role == "user":
            messages.extend(_user_messages(content, join_path(param, "content")))
        elif role == "assistant":
            messages.append(_assistant_message(content, join_path(param, "content")))
        else:
            raise unexpected_value(
                join_path(param, "role"), f"expected 'user' or 'assistant', but got {role!r}."
            )
    return messages


# ==========================================================================
# Request: tools, thinking, sampling


def _chat_tool(tool: object, param: str) -> dict[str, Any]:
    tool = as_object(tool, param)
    kind = present(tool, "type")
    if kind not in (None, "custom"):
        raise unsupported_value(
            join_path(param, "type"),
            f"Tools of type {kind!r} are not supported by this server: only custom "
            "tools (name, description, input_schema) are.",
        )
    function = function_definition(tool, param, schema="input_schema", required=True)
    return {"type": "function", "function": function}


def _tool_choice(body: Mapping[str, Any], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """``tool_choice`` as the chat request's ``tool_choice`` and ``parallel_tool_calls``."""
    choice = optional_object(body, "tool_choice", "tool_choice")
    if choice is None:
        return {}
    kind = choice.get("type")
    chosen: dict[str, Any] = {}
    if kind == "auto":
        chosen["tool_choice"] = "auto"
    elif kind == "any":
        chosen["tool_choice"] = "required"
    elif kind == "none":
        chosen["tool_choice"] = "none"
    elif kind == "tool":
        name = required_string(choice, "name", "tool_choice.name")
        if name not in {tool["function"]["name"] for tool in tools}:
            raise invalid_value("tool_choice.name", f"tool_choice.name: no tool named {name!r}.")
        chosen["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind is None:
        raise missing_parameter("tool_choice.type")
    else:
        raise unexpected_value("tool_choice.type", "expected 'auto', 'any', 'tool' or 'none'.")
    single = optional_boolean(
        choice, "disable_parallel_tool_use", "tool_choice.disable_parallel_tool_use"
    )
    if single is not None and tools:
        chosen["parallel_tool_calls"] = not single
    return chosen


def reasoning_effort(body: Mapping[str, Any]) -> str | None:
    """
    ``thinking`` as a reasoning effort: ``none`` when disabled, else by the
    budget (see :data:`_BUDGET_EFFORTS`).
    """
    thinking = optional_object(body, "thinking", "thinking")
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind == "disabled":
        return "none"
    if kind == "adaptive":
        return None  # the model decides, as it does when nothing is asked
    if kind != "enabled":
        raise unexpected_value("thinking.type", "expected 'enabled', 'disabled' or 'adaptive'.")
    budget = optional_integer(thinking, "budget_tokens", "thinking.budget_tokens", minimum=1)
    if budget is None:
        raise missing_parameter("thinking.budget_tokens")
    for most, effort in _BUDGET_EFFORTS:
        if budget <= most:
            return effort
    return "high"


def _stop_sequences(body: Mapping[str, Any]) -> list[str] | None:
    value = present(body, "stop_sequences")
    if value is None:
        return None
    sequences = []
    for index, item in enumerate(as_array(value, "stop_sequences")):
        text = as_string(item, join_path("stop_sequences", index))
        if text:
            sequences.append(text)
    return sequences or None


def chat_request(body: Mapping[str, Any], *, counting: bool = False) -> dict[str, Any]:
    """
    The chat completions request for a Messages request.

    :param counting: for ``count_tokens``, which has no ``max_tokens``.
    :raises InvalidRequest: naming the first bad field.
    """
    body = require_object_body(body)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": chat_messages(body)}
    if not counting:
        if present(body, "max_tokens") is None:
            raise missing_parameter("max_tokens")
        chat["max_completion_tokens"] = optional_integer(
            body, "max_tokens", "max_tokens", minimum=1
        )
    value = present(body, "tools")
    tools = (
        []
        if value is None
        else [
            _chat_tool(tool, join_path("tools", i))
            for i, tool in enumerate(as_array(value, "tools"))
        ]
    )
    choice = _tool_choice(body, tools)
    if tools:
        chat["tools"] = tools
        chat.update(choice)
    stop = _stop_sequences(body)
    if stop is not None:
        chat["stop"] = stop
    for name in ("temperature", "top_p"):
        number = optional_number(body, name, name, minimum=0, maximum=1)
        if number is not None:
            chat[name] = number
    top_k = optional_integer(body, "top_k", "top_k", minimum=0)
    if top_k is not None:
        chat["top_k"] = top_k
    effort = reasoning_effort(body)
    if effort is not None:
        chat["reasoning_effort"] = effort
    for name in _PASSED_THROUGH:
        if present(body, name) is not None:
            chat[name] = body[name]
    if not counting and optional_boolean(body, "stream", "stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def chat_for_backend(chat: Mapping[str, Any], runtime_options: bool) -> Mapping[str, Any]:
    """
    The chat request as one backend takes it.

    A backend with runtime options (Ollama) takes ``top_k`` and any number
    of stop sequences under ``options``; the others (vLLM, llama.cpp's
    server) read ``top_k`` at the top level, as it was left.
    """
    if not runtime_options or ("top_k" not in chat and "stop" not in chat):
        return chat
    moved = dict(chat)
    options = dict(moved.get("options") or {})
    for name in ("top_k", "stop"):
        if name in moved:
            options[name] = moved.pop(name)
    moved["options"] = options
    return moved


# ==========================================================================
# Response


def _arguments_object(arguments: object) -> dict[str, Any]:
    """A tool call's arguments (a JSON string) as the ``input`` object."""
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def stop_reason(choice: Mapping[str, Any], stop_sequences: Sequence[str]) -> tuple[str, str | None]:
    """
    ``stop_reason`` and ``stop_sequence`` from a chat choice.

    ``stop`` is ``end_turn`` unless the backend names one of the request's
    stop sequences as what stopped it (vLLM and SGLang say so in the
    choice's ``stop_reason``; Ollama and OpenAI do not tell).
    """
    finish = choice.get("finish_reason")
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if finish == "content_filter":
        return "refusal", None
    matched = choice.get("stop_reason")
    if isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def usage_of(chat_usage: object) -> dict[str, Any]:
    """A chat ``usage`` as Anthropic's (zeros when there is none)."""
    usage = chat_usage if isinstance(chat_usage, Mapping) else {}
    details = usage.get("prompt_tokens_details")
    cached = token_count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    return {
        "input_tokens": token_count(usage.get("prompt_tokens")) - cached,
        "output_tokens": token_count(usage.get("completion_tokens")),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message_from_chat(
    completion: Mapping[str, Any], *, message_id: str, model: str, stop_sequences: Sequence[str]
) -> dict[str, Any]:
    """The ``message`` object for a ``chat.completion``."""
    choices = completion.get("choices") or [{}]
    choice = _mapping(choices[0])
    message = _mapping(choice.get("message"))
    content: list[dict[str, Any]] = []
    thought = reasoning_text(message)
    if thought:
        content.append({"type": "thinking", "thinking": thought, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        call_id = call.get("id")
        name = function.get("name")
        content.append(
            {
                "type": "tool_use",
                "id": call_id
                if isinstance(call_id, str) and call_id
                else new_completion_id("toolu_"),
                "name": name if isinstance(name, str) else "",
                "input": _arguments_object(function.get("arguments")),
            }
        )
    reason, sequence = stop_reason(choice, stop_sequences)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_of(completion.get("usage")),
    }


class MessageStream(ChunkTranslator):
    """
    ``chat.completion.chunk`` objects in, Anthropic's stream events out:
    ``message_start`` and a ``ping``, then each content block (thinking,
    text, each tool call) started, fed its deltas and stopped in turn, then
    ``message_delta`` with the stop reason and the usage, and
    ``message_stop``.  The usage comes with the chat stream's last chunk, so
    ``message_start`` says zero tokens and ``message_delta`` says them all.
    """

    def __init__(self, message_id: str, model: str, stop_sequences: Sequence[str]) -> None:
        super().__init__()
        self._message_id = message_id
        self._model = model
        self._stop_sequences = stop_sequences
        self._blocks = 0
        #: The block being streamed: its kind and index.
        self._open: tuple[str, int] | None = None
        #: Tool-use blocks by the chat stream's tool-call index.
        self._calls: dict[int, int] = {}
        self._choice: dict[str, Any] = {}
        self._usage: object = None

    def start(self) -> list[dict[str, Any]]:
        self.started = True
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _note_usage(self, usage: object) -> None:
        self._usage = usage

    def _note_finish(self, choice: Mapping[str, Any]) -> None:
        self._choice = {
            "finish_reason": choice["finish_reason"],
            "stop_reason": choice.get("stop_reason"),
        }

    def _delta(self, delta: Mapping[str, Any], events: list[dict[str, Any]]) -> None:
        thought = reasoning_text(delta)
        if thought:
            index = self._block("thinking", {"thinking": "", "signature": ""}, events)
            events.append(_delta(index, {"type": "thinking_delta", "thinking": thought}))
        text = delta.get("content")
        if isinstance(text, str) and text:
            index = self._block("text", {"text": ""}, events)
            events.append(_delta(index, {"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, Mapping):
                continue
            function = _mapping(call.get("function"))
            number = call.get("index", 0)
            index = self._calls.get(number, -1)
            if index < 0:
                call_id = call.get("id")
                name = function.get("name")
                index = self._block(
                    "tool_use",
                    {
                        "id": call_id
                        if isinstance(call_id, str) and call_id
                        else new_completion_id("toolu_"),
                        "name": name if isinstance(name, str) else "",
                        "input": {},
                    },
                    events,
                    fresh=True,
                )
                self._calls[number] = index
            fragment = function.get("arguments")
            if isinstance(fragment, str) and fragment:
                events.append(_delta(index, {"type": "input_json_delta", "partial_json": fragment}))

    def _block(
        self,
        kind: str,
        fields: dict[str, Any],
        events: list[dict[str, Any]],
        *,
        fresh: bool = False,
    ) -> int:
        """The index of the open block of ``kind``, starting one if need be."""
        if not fresh and self._open is not None and self._open[0] == kind:
            return self._open[1]
        self._close(events)
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        events.append(
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": kind, **fields},
            }
        )
        return index

    def _close(self, events: list[dict[str, Any]]) -> None:
        if self._open is not None:
            events.append({"type": "content_block_stop", "index": self._open[1]})
            self._open = None

    def finish(self) -> list[dict[str, Any]]:
        events = [] if self.started else self.start()
        self._close(events)
        reason, sequence = stop_reason(self._choice, self._stop_sequences)
        usage = usage_of(self._usage)
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": usage,
            }
        )
        events.append({"type": "message_stop"})
        return events


def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}
