"""
The fake Ollama's view of incoming requests: the Go request types (whose
names appear in decode errors), the custom decoders for images, ``think``
and ``keep_alive``, and the ``Host`` check.

Declaring the types the way ``api/types.go`` does lets the generic decoder
in :mod:`oproxy.testing.ollama.gojson` produce the real server's messages, such
as ``json: cannot unmarshal string into Go struct field
ToolCallFunction.messages.tool_calls.function.arguments of type
api.ToolCallFunctionArguments`` when a client sends OpenAI-style string
arguments.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Final

from oproxy.testing.base.kinds import Kind, kind_of
from oproxy.testing.ollama.generation import Options, parse_options
from oproxy.testing.ollama.gojson import (
    ANY,
    BOOL,
    INT,
    MISMATCH,
    OPTIONS,
    STRING,
    GoAbortError,
    GoSavedError,
    GoType,
    custom,
    slice_of,
    struct,
)
from oproxy.testing.ollama.models import FakeModel
from oproxy.testing.ollama.wire import (
    GoDurationError,
    go_base64_error_offset,
    go_quote,
    parse_go_duration,
)

_THINK_LEVELS: Final = ("high", "medium", "low", "max")
_THINK_CHOICES: Final = '"high", "medium", "low", "max", true, or false'
_PRIVATE_NETWORKS: Final = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


# --------------------------------------------------------------------------
# Request types, as Go declares them (names appear in decode errors)


def keep_alive_seconds(value: Any) -> float:
    """
    Decode ``keep_alive`` like Ollama's ``api.Duration.UnmarshalJSON``: a
    number of seconds or a Go duration string; a negative value means
    "forever" (``math.inf`` here).

    :raises GoAbortError: with Ollama's message for a bad string or type.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise GoAbortError(f"Unsupported type: '{_go_any_type(value)}'")
    if isinstance(value, str):
        try:
            ns = parse_go_duration(value)
        except GoDurationError as exc:
            raise GoAbortError(str(exc)) from None
        return math.inf if ns < 0 else ns / 1e9
    return math.inf if value < 0 else float(value)


#: How Go's ``%T`` prints what ``json.Unmarshal`` makes of a value in an ``any``.
_GO_ANY_TYPES: Final[dict[Kind, str]] = {
    "boolean": "bool",
    "integer": "float64",
    "number": "float64",
    "array": "[]interface {}",
    "object": "map[string]interface {}",
}


def _go_any_type(value: Any) -> str:
    return _GO_ANY_TYPES.get(kind_of(value), "string")


def _decode_image(value: Any) -> Any:
    if not isinstance(value, str):
        return MISMATCH
    data = value.encode()
    offset = go_base64_error_offset(data)
    if offset is not None:
        raise GoSavedError(f"illegal base64 data at input byte {offset}")
    return base64.b64decode(data.replace(b"\r", b"").replace(b"\n", b""))


def _decode_think(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise GoAbortError(f"think must be a boolean or string ({_THINK_CHOICES})")
    if value not in _THINK_LEVELS:
        raise GoAbortError(f"invalid think value: {go_quote(value)} (must be {_THINK_CHOICES})")
    return value


_IMAGES: Final = slice_of(custom("api.ImageData", _decode_image), "[]api.ImageData")
_THINK: Final = custom("api.ThinkValue", _decode_think)
_KEEP_ALIVE: Final = custom("api.Duration", keep_alive_seconds)
_TOOL_CALL: Final = struct(
    "ToolCall",
    "api.ToolCall",
    id=STRING,
    function=struct(
        "ToolCallFunction",
        "api.ToolCallFunction",
        index=INT,
        name=STRING,
        arguments=GoType("map", "api.ToolCallFunctionArguments"),
    ),
)
_MESSAGE: Final = struct(
    "Message",
    "api.Message",
    role=STRING,
    content=STRING,
    thinking=STRING,
    images=_IMAGES,
    tool_calls=slice_of(_TOOL_CALL, "[]api.ToolCall"),
    tool_name=STRING,
    tool_call_id=STRING,
)
_TOOL: Final = struct(
    "Tool",
    "api.Tool",
    type=STRING,
    items=ANY,
    function=struct(
        "ToolFunction",
        "api.ToolFunction",
        name=STRING,
        description=STRING,
        parameters=GoType("map", "api.ToolFunctionParameters"),
    ),
)
_INFERENCE: Final = {
    "format": ANY,
    "options": OPTIONS,
    "stream": BOOL,
    "keep_alive": _KEEP_ALIVE,
    "think": _THINK,
    "truncate": BOOL,
    "shift": BOOL,
    "logprobs": BOOL,
    "top_logprobs": INT,
    "_debug_render_only": BOOL,
}
CHAT_REQUEST: Final = struct(
    "ChatRequest",
    "api.ChatRequest",
    model=STRING,
    messages=slice_of(_MESSAGE, "[]api.Message"),
    tools=slice_of(_TOOL, "api.Tools"),
    **_INFERENCE,
)
GENERATE_REQUEST: Final = struct(
    "GenerateRequest",
    "api.GenerateRequest",
    model=STRING,
    prompt=STRING,
    suffix=STRING,
    system=STRING,
    template=STRING,
    context=slice_of(INT, "[]int"),
    raw=BOOL,
    images=_IMAGES,
    **_INFERENCE,
)
EMBED_REQUEST: Final = struct(
    "EmbedRequest",
    "api.EmbedRequest",
    model=STRING,
    input=ANY,
    keep_alive=_KEEP_ALIVE,
    truncate=BOOL,
    dimensions=INT,
    options=OPTIONS,
)
EMBEDDING_REQUEST: Final = struct(
    "EmbeddingRequest",
    "api.EmbeddingRequest",
    model=STRING,
    prompt=STRING,
    keep_alive=_KEEP_ALIVE,
    options=OPTIONS,
)
SHOW_REQUEST: Final = struct(
    "ShowRequest",
    "api.ShowRequest",
    model=STRING,
    system=STRING,
    template=STRING,
    verbose=BOOL,
    options=OPTIONS,
    name=STRING,
)


def _registry_request(struct_name: str) -> GoType:
    """Pull and push: two structs in Ollama, with the same fields."""
    return struct(
        struct_name,
        f"api.{struct_name}",
        model=STRING,
        insecure=BOOL,
        username=STRING,
        password=STRING,
        stream=BOOL,
        name=STRING,
    )


PULL_REQUEST: Final = _registry_request("PullRequest")
PUSH_REQUEST: Final = _registry_request("PushRequest")
_FILES: Final = GoType("map", "map[string]string")
CREATE_REQUEST: Final = struct(
    "CreateRequest",
    "api.CreateRequest",
    model=STRING,
    stream=BOOL,
    quantize=STRING,
    draft_quantize=STRING,
    **{"from": STRING},
    remote_host=STRING,
    files=_FILES,
    draft_files=_FILES,
    adapters=_FILES,
    template=STRING,
    license=ANY,
    system=STRING,
    parameters=OPTIONS,
    messages=slice_of(_MESSAGE, "[]api.Message"),
    renderer=STRING,
    parser=STRING,
    requires=STRING,
    info=OPTIONS,
    name=STRING,
    quantization=STRING,
)
DELETE_REQUEST: Final = struct("DeleteRequest", "api.DeleteRequest", model=STRING, name=STRING)
COPY_REQUEST: Final = struct("CopyRequest", "api.CopyRequest", source=STRING, destination=STRING)


# --------------------------------------------------------------------------
# Checks every inference handler makes, with the real server's messages


class RequestError(Exception):
    """
    Answer the request with ``{"error": message}`` and ``status``.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_top_logprobs(req: Mapping[str, Any]) -> None:
    """
    ``top_logprobs`` must be within 0..20 (400 otherwise).
    """
    if not 0 <= req.get("top_logprobs", 0) <= 20:
        raise RequestError(400, "top_logprobs must be between 0 and 20")


def thinking_enabled(req: Mapping[str, Any], model: FakeModel, name: str) -> bool:
    """
    Whether the model thinks: a thinking model does unless ``think`` is
    false (on by default since 0.12.4); asking any other model to think is a
    400 ``"NAME" does not support thinking``.
    """
    think = req.get("think")
    if model.has("thinking"):
        return think is None or bool(think)
    if think:
        raise RequestError(400, f"{go_quote(name)} does not support thinking")
    return False


def require_capabilities(model: FakeModel, name: str, verb: str, wanted: Sequence[str]) -> None:
    """
    The scheduler's capability check: no ``completion`` gives ``"NAME" does
    not support chat`` (or ``generate``); another missing capability gives
    ``<full name> does not support <capability>``.
    """
    if not model.has("completion"):
        raise RequestError(400, f"{go_quote(name)} does not support {verb}")
    missing = "\n".join(c for c in wanted if not model.has(c))
    if missing:
        raise RequestError(400, f"{model.parsed.full} does not support {missing}")


def request_options(req: Mapping[str, Any]) -> Options:
    """
    The request's ``options``, or a 500 with Go's message for a bad type.
    """
    options = parse_options(req.get("options"))
    if isinstance(options, str):
        raise RequestError(500, options)
    return options


def check_format(value: Any) -> None:
    """
    ``format`` must be absent, ``""``, ``"json"`` or a schema object; the
    runner refuses anything else with a 500 quoting the raw JSON.
    """
    if value in (None, "", "json") or isinstance(value, dict):
        return
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    expected = 'expected "json" or a valid JSON Schema object'
    raise RequestError(500, f"invalid format: {go_quote(raw)}; {expected}")


def version_tuple(version: str) -> tuple[int, ...]:
    """
    ``0.12.6`` as ``(0, 12, 6)``, for behaviour that changed between
    releases.
    """
    parts = version.split("-")[0].split(".")
    return tuple(int(p) if p.isdigit() else 0 for p in parts)


def _split_host_port(host: str) -> str:
    """
    The host part of a ``Host`` header the way Go's ``net.SplitHostPort``
    sees it, falling back to the whole header when that fails.
    """
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 and host[end + 1 : end + 2] == ":" else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(header: bytes | None) -> bool:
    """
    Ollama's ``allowedHostsMiddleware`` for a loopback listener: loopback,
    private and unspecified IPs, ``localhost``, this machine's hostname and
    names under ``.localhost``, ``.local`` and ``.internal`` are allowed.
    """
    host = _split_host_port((header or b"").decode("latin-1"))
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip.is_loopback or ip.is_unspecified or any(ip in n for n in _PRIVATE_NETWORKS)
    host = host.lower()
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    return any(host.endswith(f".{tld}") for tld in ("localhost", "local", "internal"))


def embed_inputs(value: Any) -> list[str]:
    """
    ``input`` as Ollama's embed handler reads it: a string (none when
    empty) or a list of strings; anything else is a 400 ``invalid input
    type``.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise RequestError(400, "invalid input type")
