"""
``/v1/chat/completions`` ⇄ Ollama ``/api/chat``.

The request side validates the whole OpenAI body and builds the native one;
the response side builds ``chat.completion`` objects and, through
:class:`ChatStreamTranslator`, ``chat.completion.chunk`` events.

Where Ollama's own /v1 layer is weak (see the translation reference, §12)
this module does better: text parts of one message are joined rather than
split into extra turns, ``content: null`` assistant turns are accepted,
``developer`` becomes ``system``, image URLs are fetched by the HTTP layer,
``tool_choice`` is emulated as far as it can be, thinking is returned as
``reasoning_content``, and a streamed tool call ends with
``finish_reason: "tool_calls"`` even though Ollama's final line says ``stop``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final

import orjson

from oproxy.errors import InvalidRequest
from oproxy.images import formats
from oproxy.translate.common import (
    StreamTranslation,
    as_array,
    as_object,
    as_string,
    compact_json,
    ensure_json_safe,
    envelope,
    generation_options,
    invalid_value,
    join_path,
    missing_parameter,
    native_format,
    native_think,
    new_completion_id,
    optional_boolean,
    optional_integer,
    optional_object,
    optional_string,
    present,
    raise_for_upstream_error,
    require_object_body,
    required_object,
    required_string,
    unsupported_value,
    usage_from_ollama,
    wants_stream,
    wants_usage_chunk,
    wrong_type,
)
from oproxy.translate.tools import chosen_format, function_definition, function_tool

_NO_IMAGES: Final[Mapping[str, str]] = MappingProxyType({})

_NATIVE_ROLES: Final[Mapping[str, str]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
"""OpenAI role → native role.  ``developer`` is the o1-era name for ``system``;
Go-template models silently ignore a role they do not know."""


# ==========================================================================
# Request: content parts and images


_DATA_URL: Final = re.compile(
    r"data:(?:image/(?P<subtype>[A-Za-z0-9.+-]+))?;base64,(?P<data>.*)", re.DOTALL | re.IGNORECASE
)
_BASE64_TEXT: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_WHITESPACE: Final = re.compile(r"\s+")


def is_remote_url(url: str) -> bool:
    """Whether ``url`` is an ``http://`` or ``https://`` URL to fetch."""
    return url[:8].lower().startswith(("http://", "https://"))


def _decode_base64(text: str) -> tuple[str, bytes] | None:
    """``text`` as canonical padded base64 and the bytes it holds, or None."""
    compact = _WHITESPACE.sub("", text)
    if not compact or not _BASE64_TEXT.fullmatch(compact):
        return None
    unpadded = compact.rstrip("=")
    if len(unpadded) % 4 == 1:
        return None
    padded = unpadded + "=" * (-len(unpadded) % 4)
    try:
        return padded, binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error:
        return None


def clean_base64(text: str) -> str | None:
    """
    ``text`` as canonical standard base64, or None if it is not base64.

    Line breaks are removed and missing padding is added, as lenient encoders
    produce both; the native API wants strict padded base64 in ``images``.
    """
    decoded = _decode_base64(text)
    return decoded[0] if decoded is not None else None


def _image_from_data_url(url: str, param: str, prepared: Mapping[str, str]) -> str:
    """
    The bare base64 of a ``data:image/...;base64,`` URL, in a format Ollama
    reads.

    The format is read from the bytes, whatever the media type says.  An
    image Ollama reads is passed on once its header is checked; one that
    is converted comes from ``prepared``, where the HTTP layer put it after
    converting it off the reactor thread, or is converted here.
    """
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise invalid_value(
            param,
            "Invalid image: expected a data URL such as 'data:image/png;base64,...' "
            "or an http(s) URL.",
        )
    decoded = _decode_base64(match.group("data"))
    if decoded is None:
        raise invalid_value(param, "Invalid image: the data URL does not hold valid base64.")
    text, data = decoded
    kind = formats.sniff(data[: formats.SNIFF_BYTES])
    try:
        if kind is None or kind.action == "audio":
            raise formats.unsupported(None)
        if kind.action == "refuse":
            raise formats.unsupported(kind)
        if kind.action == "pass":
            formats.check(data, kind)
            return text
        converted = prepared.get(url)
        if converted is not None:
            return converted
        return base64.b64encode(formats.to_png(data, kind)).decode("ascii")
    except formats.UnusableImage as e:
        raise InvalidRequest(
            f"The image at '{param}' {e}", param=param, code="invalid_image_format"
        ) from None


def _image_from_url(url: str, param: str, fetched_images: Mapping[str, str]) -> str:
    """The base64 image for an ``image_url``: decoded inline, or fetched earlier."""
    if url[:5].lower() == "data:":
        return _image_from_data_url(url, param, fetched_images)
    if not is_remote_url(url):
        raise invalid_value(param, "Invalid image: expected a data URL or an http(s) URL.")
    image = fetched_images.get(url)
    if image is None:
        raise invalid_value(param, f"The image at '{param}' could not be retrieved.")
    return image


def _image_url_of(part: Mapping[str, Any], param: str) -> str:
    """The URL of an ``image_url`` part (an object with ``url``, or a bare string)."""
    if "image_url" not in part:
        raise missing_parameter(join_path(param, "image_url"))
    value = part["image_url"]
    if isinstance(value, str):
        return value
    image_url = as_object(value, join_path(param, "image_url"))
    if image_url.get("url") is None:
        raise missing_parameter(join_path(param, "image_url", "url"))
    return as_string(image_url["url"], join_path(param, "image_url", "url"))


def _audio_of(part: Mapping[str, Any], param: str) -> str:
    """
    The base64 audio of an ``input_audio`` part.

    Ollama passes audio to audio-capable models in ``images``, as its /v1 does.
    """
    audio = as_object(part.get("input_audio"), join_path(param, "input_audio"))
    data_param = join_path(param, "input_audio", "data")
    if audio.get("data") is None:
        raise missing_parameter(data_param)
    data = clean_base64(as_string(audio["data"], data_param))
    if data is None:
        raise invalid_value(data_param, "Invalid audio: 'data' must be base64.")
    return data


def _part_text(part: Mapping[str, Any], key: str, param: str) -> str:
    """The string under ``key`` of a text-like part."""
    if part.get(key) is None:
        raise missing_parameter(join_path(param, key))
    return as_string(part[key], join_path(param, key))


def _content_part(
    part: object, param: str, fetched_images: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """One content part as ``(text, image)``, exactly one of them set."""
    part = as_object(part, param)
    part_type = part.get("type")
    if part_type is None:
        raise missing_parameter(join_path(param, "type"))
    if part_type == "text":
        return _part_text(part, "text", param), None
    if part_type == "refusal":
        return _part_text(part, "refusal", param), None
    if part_type == "image_url":
        url = _image_url_of(part, param)
        return None, _image_from_url(url, join_path(param, "image_url"), fetched_images)
    if part_type == "input_audio":
        return None, _audio_of(part, param)
    if part_type == "file":
        raise unsupported_value(
            join_path(param, "type"), "File content parts are not supported by this server."
        )
    raise invalid_value(
        join_path(param, "type"),
        f"Invalid value for '{join_path(param, 'type')}': expected one of 'text', "
        f"'image_url', 'input_audio' or 'refusal', but got {part_type!r}.",
    )


def _content_and_images(
    message: Mapping[str, Any], param: str, role: str, fetched_images: Mapping[str, str]
) -> tuple[str, list[str]]:
    """
    A message's text and images.

    The text parts of one message are joined with newlines into one native
    message.  Ollama's /v1 turns each part into its own message instead, so
    the model sees extra turns that the client never wrote.
    """
    content_param = join_path(param, "content")
    if "content" not in message and role not in {"assistant", "function"}:
        raise missing_parameter(content_param)
    content = message.get("content")
    if content is None:
        if role in {"assistant", "function"}:
            return "", []
        raise wrong_type(content_param, "a string or an array of content parts", content)
    if isinstance(content, str):
        return content, []
    parts = as_array(content, content_param)
    texts: list[str] = []
    images: list[str] = []
    for index, part in enumerate(parts):
        text, image = _content_part(part, join_path(content_param, index), fetched_images)
        if text is not None:
            texts.append(text)
        if image is not None:
            images.append(image)
    return "\n".join(texts), images


# ==========================================================================
# Request: messages


def _arguments_object(value: object, param: str) -> dict[str, Any]:
    """
    Assistant tool-call ``arguments`` (a JSON string) as the native object.

    An empty string means "no arguments", as some clients send for
    parameterless tools; an object is accepted as sent.
    """
    if isinstance(value, Mapping):
        return dict(ensure_json_safe(value, param))
    text = as_string(value, param)
    if not text.strip():
        return {}
    try:
        parsed = orjson.loads(text)
    except ValueError:
        raise invalid_value(param, f"Invalid '{param}': not valid JSON.") from None
    if not isinstance(parsed, dict):
        raise invalid_value(param, f"Invalid '{param}': expected a JSON object.")
    return parsed


def _native_tool_call(call: object, param: str) -> dict[str, Any]:
    """One assistant ``tool_calls`` entry in native form."""
    call = as_object(call, param)
    call_type = present(call, "type")
    if call_type is not None and call_type != "function":
        raise invalid_value(
            join_path(param, "type"), "Only tool calls of type 'function' are supported."
        )
    if call.get("function") is None:
        raise missing_parameter(join_path(param, "function"))
    function = as_object(call["function"], join_path(param, "function"))
    name_param = join_path(param, "function", "name")
    if function.get("name") is None:
        raise missing_parameter(name_param)
    arguments_param = join_path(param, "function", "arguments")
    if "arguments" not in function:
        raise missing_parameter(arguments_param)
    native_function = {
        "name": as_string(function["name"], name_param),
        "arguments": _arguments_object(function["arguments"], arguments_param),
    }
    native: dict[str, Any] = {}
    call_id = optional_string(call, "id", join_path(param, "id"))
    if call_id:
        native["id"] = call_id
    native["function"] = native_function
    return native


def _native_tool_calls(message: Mapping[str, Any], param: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` in native form (arguments parsed)."""
    value = present(message, "tool_calls")
    if value is None:
        return []
    calls_param = join_path(param, "tool_calls")
    return [
        _native_tool_call(call, join_path(calls_param, index))
        for index, call in enumerate(as_array(value, calls_param))
    ]


def _thinking(message: Mapping[str, Any], param: str) -> str | None:
    """
    Earlier reasoning sent back on an assistant turn, as native ``thinking``.

    DeepSeek, vLLM and our own responses call it ``reasoning_content``; Ollama
    calls it ``reasoning``.  Either is accepted.
    """
    for key in ("reasoning_content", "reasoning"):
        text = optional_string(message, key, join_path(param, key))
        if text:
            return text
    return None


def _tool_name_for(call_id: str | None, earlier_calls: list[dict[str, Any]]) -> str | None:
    """The function name of the latest earlier assistant call with ``call_id``."""
    if call_id is None:
        return None
    for call in reversed(earlier_calls):
        if call.get("id") == call_id:
            name: str = call["function"]["name"]
            return name
    return None


def _add_tool_result_fields(
    native: dict[str, Any],
    message: Mapping[str, Any],
    param: str,
    earlier_calls: list[dict[str, Any]],
) -> None:
    """
    ``tool_name`` and ``tool_call_id`` for a tool result.

    Templates render the tool's name, which OpenAI clients do not send: it is
    found from the assistant call with the same id.  ``tool_call_id`` stays
    optional because clients written against Ollama leave it out.
    """
    call_id = optional_string(message, "tool_call_id", join_path(param, "tool_call_id"))
    name = optional_string(message, "name", join_path(param, "name"))
    tool_name = name or _tool_name_for(call_id, earlier_calls)
    if tool_name:
        native["tool_name"] = tool_name
    if call_id:
        native["tool_call_id"] = call_id


def _role_of(message: Mapping[str, Any], param: str) -> str:
    """The OpenAI role of a message, checked."""
    role_param = join_path(param, "role")
    if message.get("role") is None:
        raise missing_parameter(role_param)
    role = as_string(message["role"], role_param)
    if role not in _NATIVE_ROLES:
        raise invalid_value(
            role_param,
            f"Invalid value for '{role_param}': expected one of 'system', 'developer', "
            f"'user', 'assistant' or 'tool', but got {role!r}.",
        )
    return role


def _native_message(
    message: object,
    param: str,
    earlier_calls: list[dict[str, Any]],
    fetched_images: Mapping[str, str],
) -> dict[str, Any]:
    """One OpenAI message as one native message."""
    message = as_object(message, param)
    role = _role_of(message, param)
    content, images = _content_and_images(message, param, role, fetched_images)
    native: dict[str, Any] = {"role": _NATIVE_ROLES[role], "content": content}
    if images:
        native["images"] = images
    if role == "assistant":
        thinking = _thinking(message, param)
        if thinking:
            native["thinking"] = thinking
        tool_calls = _native_tool_calls(message, param)
        if tool_calls:
            native["tool_calls"] = tool_calls
            earlier_calls.extend(tool_calls)
    elif role in {"tool", "function"}:
        _add_tool_result_fields(native, message, param, earlier_calls)
    return native


def _native_messages(
    body: Mapping[str, Any], fetched_images: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The conversation in native form."""
    if body.get("messages") is None:
        raise missing_parameter("messages")
    messages = as_array(body["messages"], "messages")
    if not messages:
        raise invalid_value(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
        )
    earlier_calls: list[dict[str, Any]] = []
    return [
        _native_message(message, join_path("messages", index), earlier_calls, fetched_images)
        for index, message in enumerate(messages)
    ]


# ==========================================================================
# Request: tools, response_format, reasoning


def _native_tool(tool: object, param: str) -> dict[str, Any]:
    """One ``tools`` entry, checked; only function tools exist natively."""
    tool = function_tool(tool, param, "Only tools of type 'function' are supported.")
    function_param = join_path(param, "function")
    function = required_object(tool, "function", function_param)
    return {"type": "function", "function": function_definition(function, function_param)}


def _named_function(choice: Mapping[str, Any], param: str) -> str:
    """The ``function.name`` of a forced tool choice."""
    function_param = join_path(param, "function")
    function = required_object(choice, "function", function_param)
    return required_string(function, "name", join_path(function_param, "name"))


def _keep_named(tools: list[dict[str, Any]], names: list[str], param: str) -> list[dict[str, Any]]:
    """The tools whose names are in ``names``; an unknown name is a 400."""
    known = {tool["function"]["name"] for tool in tools}
    for name in names:
        if name not in known:
            raise invalid_value(param, f"Invalid '{param}': no tool named {name!r} in 'tools'.")
    return [tool for tool in tools if tool["function"]["name"] in names]


def _allowed_tool_names(choice: Mapping[str, Any]) -> list[str]:
    """The names listed by an ``allowed_tools`` tool choice."""
    param = "tool_choice.allowed_tools"
    if choice.get("allowed_tools") is None:
        raise missing_parameter(param)
    allowed = as_object(choice["allowed_tools"], param)
    mode = optional_string(allowed, "mode", join_path(param, "mode"))
    if mode not in {None, "auto", "required"}:
        raise invalid_value(join_path(param, "mode"), "Expected 'auto' or 'required'.")
    if allowed.get("tools") is None:
        raise missing_parameter(join_path(param, "tools"))
    entries = as_array(allowed["tools"], join_path(param, "tools"))
    names = []
    for index, entry in enumerate(entries):
        entry_param = join_path(param, "tools", index)
        names.append(_named_function(as_object(entry, entry_param), entry_param))
    return names


def _apply_tool_choice(tools: list[dict[str, Any]], choice: object) -> list[dict[str, Any]]:
    """
    The tools to send, given ``tool_choice``.

    Ollama ignores ``tool_choice``; it can be emulated by what the model is
    shown: ``none`` sends no tools, a forced function sends only that one.
    ``required`` cannot be enforced and keeps all tools.
    """
    if choice is None or choice == "auto" or choice == "required":
        return tools
    if choice == "none":
        return []
    if isinstance(choice, str):
        raise invalid_value(
            "tool_choice",
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or an object.",
        )
    choice = as_object(choice, "tool_choice")
    choice_type = choice.get("type")
    if choice_type == "function":
        name = _named_function(choice, "tool_choice")
        return _keep_named(tools, [name], "tool_choice.function.name")
    if choice_type == "allowed_tools":
        return _keep_named(tools, _allowed_tool_names(choice), "tool_choice.allowed_tools.tools")
    raise invalid_value(
        "tool_choice.type", "Invalid 'tool_choice.type': expected 'function' or 'allowed_tools'."
    )


def _native_tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``tools`` checked and filtered by ``tool_choice``."""
    value = present(body, "tools")
    tools = [] if value is None else as_array(value, "tools")
    native = [_native_tool(tool, join_path("tools", index)) for index, tool in enumerate(tools)]
    return _apply_tool_choice(native, present(body, "tool_choice"))


def _format_from_response_format(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """
    ``response_format`` as native ``format``.

    Only the JSON Schema itself goes upstream: ``name`` and ``strict`` have no
    native equivalent.  A ``json_schema`` without a schema is refused rather
    than silently run unconstrained.
    """
    chosen = chosen_format(body, "response_format", "response_format")
    if chosen is None:
        return None
    kind, response_format = chosen
    if kind == "json_object":
        return "json"
    param = "response_format.json_schema"
    json_schema = required_object(response_format, "json_schema", param)
    schema = required_object(json_schema, "schema", join_path(param, "schema"))
    return dict(ensure_json_safe(schema, join_path(param, "schema")))


_EFFORT_TO_THINK: Final[Mapping[str, bool | str]] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "ultra": "high",
    "max": "high",
}
"""OpenAI effort → native ``think``.  The top levels clamp to ``high``, which
every thinking-capable Ollama accepts (``max`` needs 0.21.3 or later)."""


def _requested_effort(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(effort, param)`` from ``reasoning.effort`` (which wins) or ``reasoning_effort``."""
    reasoning = optional_object(body, "reasoning", "reasoning")
    if reasoning is not None:
        effort = optional_string(reasoning, "effort", "reasoning.effort")
        if effort:
            return effort, "reasoning.effort"
    effort = optional_string(body, "reasoning_effort", "reasoning_effort")
    return (effort, "reasoning_effort") if effort else None


def _think(body: Mapping[str, Any]) -> bool | str | None:
    """
    Native ``think`` from the reasoning effort, else a native top-level ``think``.

    Thinking models think by default on Ollama; ``"none"`` is the only way an
    OpenAI client can turn that off, and it becomes ``think: false``.
    """
    requested = _requested_effort(body)
    if requested is None:
        return native_think(body)
    effort, param = requested
    think = _EFFORT_TO_THINK.get(effort.strip().lower())
    if think is None:
        raise invalid_value(
            param,
            f"Invalid value for '{param}': {effort!r} (expected one of 'none', 'minimal', "
            "'low', 'medium', 'high', 'xhigh', 'ultra' or 'max').",
        )
    return think


def _add_logprobs(native: dict[str, Any], body: Mapping[str, Any]) -> None:
    """``logprobs`` and ``top_logprobs`` (0..20, Ollama's limit and OpenAI's)."""
    logprobs = optional_boolean(body, "logprobs", "logprobs")
    if logprobs is not None:
        native["logprobs"] = logprobs
    top = optional_integer(body, "top_logprobs", "top_logprobs", minimum=0, maximum=20)
    if top is not None:
        native["top_logprobs"] = top


def chat_request_to_ollama(
    body: Mapping[str, Any],
    *,
    model: str,
    fetched_images: Mapping[str, str] = _NO_IMAGES,
) -> dict[str, Any]:
    """
    The native ``/api/chat`` body for an OpenAI chat request.

    :param model: the upstream model name chosen by routing.
    :param fetched_images: base64 images by URL, made ready by the HTTP
        layer: the http(s) URLs that :func:`remote_image_urls` listed,
        fetched, and data URLs in formats Ollama cannot read, converted.
    :raises InvalidRequest: naming the first bad field.

    ``n`` is checked but not sent: Ollama makes one choice a call, and the
    HTTP layer (:mod:`oproxy.api.choices`) makes one call per choice.
    """
    body = require_object_body(body)
    optional_integer(body, "n", "n", minimum=1)  # the HTTP layer runs one call per choice
    wants_usage_chunk(body)
    native: dict[str, Any] = {
        "model": model,
        "messages": _native_messages(body, fetched_images),
        "stream": wants_stream(body),
    }
    tools = _native_tools(body)
    if tools:
        native["tools"] = tools
    response_format = _format_from_response_format(body)
    format_ = response_format if response_format is not None else native_format(body)
    if format_ is not None:
        native["format"] = format_
    options, top_level = generation_options(body)
    if options:
        native["options"] = options
    think = _think(body)
    if think is not None:
        native["think"] = think
    _add_logprobs(native, body)
    native.update(top_level)
    return native


class _RecordingImages(Mapping[str, str]):
    """
    A stand-in for fetched images that records which URLs were looked up.

    Running the real translation with it lists the remote URLs in the order
    the translation needs them, and validates the whole request first.
    """

    def __init__(self) -> None:
        self.urls: dict[str, None] = {}

    def __getitem__(self, url: str) -> str:
        # A data URL to convert is looked up too: it is not fetched, and
        # the first pass need not convert it.
        if is_remote_url(url):
            self.urls[url] = None
        return ""

    def __iter__(self) -> Iterator[str]:
        return iter(self.urls)

    def __len__(self) -> int:
        return len(self.urls)


def _mentions_remote_image(body: Mapping[str, Any]) -> bool:
    """A cheap, lenient scan: could any content part be an http(s) image?"""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        for part in content if isinstance(content, list) else ():
            image_url = part.get("image_url") if isinstance(part, Mapping) else None
            url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
            if isinstance(url, str) and is_remote_url(url):
                return True
    return False


def image_parts(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    """
    The URL and ``param`` of every ``image_url`` part, inline or remote,
    found leniently: the count is checked and the images are prepared
    before the translation validates them.
    """
    messages = body.get("messages") if isinstance(body, Mapping) else None
    if not isinstance(messages, list):
        return []
    found: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for number, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "image_url":
                continue
            value = part.get("image_url")
            url = value.get("url") if isinstance(value, Mapping) else value
            if isinstance(url, str):
                found.append((url, join_path("messages", index, "content", number, "image_url")))
    return found


def remote_image_urls(body: Mapping[str, Any]) -> list[str]:
    """
    The http(s) image URLs in the messages, deduplicated, in order.

    Ollama's /v1 refuses image URLs; the HTTP layer fetches these (with a
    size cap and a timeout) and passes them to :func:`chat_request_to_ollama`.
    When there are any, the whole request is validated first, so a bad
    request is refused before anything is fetched.

    :raises InvalidRequest: if the request would be refused anyway.
    """
    if not _mentions_remote_image(require_object_body(body)):
        return []
    recorder = _RecordingImages()
    chat_request_to_ollama(body, model="", fetched_images=recorder)
    return list(recorder.urls)


# ==========================================================================
# Response: shared pieces


def _text(value: object) -> str:
    """A string field from upstream; anything else reads as empty."""
    return value if isinstance(value, str) else ""


def _mapping(value: object) -> Mapping[str, Any]:
    """An object field from upstream; anything else reads as empty."""
    return value if isinstance(value, Mapping) else {}


def _items(value: object) -> list[Any]:
    """An array field from upstream; anything else reads as empty."""
    return value if isinstance(value, list) else []


def _arguments_text(arguments: object) -> str:
    """Native tool-call arguments (an object) as OpenAI's JSON string."""
    if isinstance(arguments, str):
        return arguments
    if arguments is None:
        return "{}"
    return compact_json(arguments)


def _openai_tool_call(call: object) -> dict[str, Any] | None:
    """
    A native tool call as an OpenAI one, or None if it has no function.

    Ollama before 0.12.10 sends no ``id``; one is made so the client can
    answer the call with a matching ``tool_call_id``.
    """
    function = _mapping(_mapping(call).get("function"))
    if not function:
        return None
    call_id = _mapping(call).get("id")
    return {
        "id": call_id if isinstance(call_id, str) and call_id else new_completion_id("call_"),
        "type": "function",
        "function": {
            "name": _text(function.get("name")),
            "arguments": _arguments_text(function.get("arguments")),
        },
    }


def _openai_tool_calls(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The OpenAI tool calls of a native message, malformed entries skipped."""
    calls = (_openai_tool_call(call) for call in _items(message.get("tool_calls")))
    return [call for call in calls if call is not None]


def _number(value: object) -> float | int | None:
    """A finite number from upstream, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def _token_bytes(value: object) -> list[int] | None:
    """A token's UTF-8 bytes, or None when upstream gave none."""
    if not isinstance(value, list):
        return None
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return list(value)
    return None


def _top_logprob(entry: object) -> dict[str, Any] | None:
    """One alternative token with its log probability."""
    entry = _mapping(entry)
    token, logprob = entry.get("token"), _number(entry.get("logprob"))
    if not isinstance(token, str) or logprob is None:
        return None
    return {"token": token, "logprob": logprob, "bytes": _token_bytes(entry.get("bytes"))}


def _token_logprob(entry: object) -> dict[str, Any] | None:
    """One native logprob entry as OpenAI's ``ChatCompletionTokenLogprob``."""
    top_level = _top_logprob(entry)
    if top_level is None:
        return None
    alternatives = (_top_logprob(item) for item in _items(_mapping(entry).get("top_logprobs")))
    top_level["top_logprobs"] = [item for item in alternatives if item is not None]
    return top_level


def chat_logprobs(native_logprobs: object) -> dict[str, Any] | None:
    """
    Native ``logprobs`` as a choice's ``logprobs``, or None when there are none.
    """
    if not isinstance(native_logprobs, list):
        return None
    content = (_token_logprob(entry) for entry in native_logprobs)
    return {"content": [entry for entry in content if entry is not None], "refusal": None}


def chat_finish_reason(done_reason: object, *, called_tools: bool) -> str:
    """
    OpenAI ``finish_reason`` from the native ``done_reason``.

    Ollama leaves ``done_reason`` at ``stop`` after a tool call; clients loop
    on ``tool_calls``, so it wins, except over ``length``: a call cut short
    must not look complete.  ``load``/``unload`` and anything unknown read as
    ``stop``, the only other value OpenAI's enum allows here.
    """
    if done_reason == "length":
        return "length"
    return "tool_calls" if called_tools else "stop"


def ollama_chat_to_openai(
    native: Mapping[str, Any], *, completion_id: str, model: str, created: int
) -> dict[str, Any]:
    """
    A ``chat.completion`` object from a non-streamed native chat response.

    :raises UpstreamError: if ``native`` is an ``{"error": ...}`` object.
    """
    raise_for_upstream_error(native)
    message = _mapping(native.get("message"))
    content = _text(message.get("content"))
    tool_calls = _openai_tool_calls(message)
    response_message: dict[str, Any] = {
        "role": "assistant",
        "content": None if tool_calls and not content else content,
        "refusal": None,
    }
    thinking = _text(message.get("thinking"))
    if thinking:
        response_message["reasoning_content"] = thinking
    if tool_calls:
        response_message["tool_calls"] = tool_calls
    choice = {
        "index": 0,
        "message": response_message,
        "logprobs": chat_logprobs(native.get("logprobs")),
        "finish_reason": chat_finish_reason(
            native.get("done_reason"), called_tools=bool(tool_calls)
        ),
    }
    return {
        **envelope("chat.completion", completion_id=completion_id, model=model, created=created),
        "choices": [choice],
        "usage": usage_from_ollama(native),
    }


# ==========================================================================
# Response: streaming


class ChatStreamTranslator(StreamTranslation):
    """
    Native ``/api/chat`` NDJSON lines in, ``chat.completion.chunk`` objects out.

    The shape follows OpenAI's own streams: the first chunk carries
    ``role: "assistant"``; thinking, text and each tool call travel in their
    own chunks; a final ``delta: {}`` chunk carries ``finish_reason``; with
    ``include_usage`` a ``choices: []`` chunk carries the usage and every
    other chunk says ``"usage": null``.
    """

    def __init__(
        self, completion_id: str, model: str, created: int, *, include_usage: bool
    ) -> None:
        super().__init__(
            "chat.completion.chunk", completion_id=completion_id, model=model, created=created
        )
        self._include_usage = include_usage
        self._started = False
        self._tool_calls_sent = 0

    def feed(self, native_line: Mapping[str, Any]) -> list[dict[str, Any]]:
        raise_for_upstream_error(native_line)
        if self.done:
            return []
        message = _mapping(native_line.get("message"))
        logprobs = chat_logprobs(native_line.get("logprobs"))
        deltas = self._deltas(message, logprobs if logprobs and logprobs["content"] else None)
        finished = native_line.get("done") is True
        if not self._started and (deltas or finished):
            deltas = self._with_role(deltas)
        chunks = [self._chunk(delta, logprobs) for delta, logprobs in deltas]
        if finished:
            chunks.extend(self._finish(native_line))
        return chunks

    def _deltas(
        self, message: Mapping[str, Any], logprobs: dict[str, Any] | None
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """
        ``(delta, logprobs)`` pairs for one native message, in the order a
        client shows them: thinking, then text, then each tool call.  The
        logprobs go with the text when there is any.
        """
        deltas: list[dict[str, Any]] = []
        thinking = _text(message.get("thinking"))
        if thinking:
            deltas.append({"reasoning_content": thinking})
        content = _text(message.get("content"))
        if content:
            self._text_parts.append(content)
            deltas.append({"content": content})
        for call in _openai_tool_calls(message):
            deltas.append({"tool_calls": [{"index": self._tool_calls_sent, **call}]})
            self._tool_calls_sent += 1
        if logprobs is not None and not deltas:
            deltas.append({"content": ""})
        carrier = next((d for d in deltas if "content" in d), deltas[0] if deltas else None)
        return [(delta, logprobs if delta is carrier else None) for delta in deltas]

    def _with_role(
        self, deltas: list[tuple[dict[str, Any], dict[str, Any] | None]]
    ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """
        Announce the assistant role once: on the first text delta when the
        stream starts with text, else in a ``{"role", "content": ""}`` chunk
        of its own, as OpenAI's first chunk looks.
        """
        self._started = True
        if deltas and set(deltas[0][0]) == {"content"}:
            first, logprobs = deltas[0]
            return [({"role": "assistant", **first}, logprobs), *deltas[1:]]
        return [({"role": "assistant", "content": ""}, None), *deltas]

    def _chunk(
        self,
        delta: dict[str, Any],
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        chunk = {**self._envelope, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _finish(self, native_line: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The finish chunk and, if asked for, the usage chunk."""
        self.done = True
        self.usage = usage_from_ollama(native_line)
        reason = chat_finish_reason(
            native_line.get("done_reason"), called_tools=self._tool_calls_sent > 0
        )
        chunks = [self._chunk({}, finish_reason=reason)]
        if self._include_usage:
            chunks.append({**self._envelope, "choices": [], "usage": self.usage})
        return chunks
